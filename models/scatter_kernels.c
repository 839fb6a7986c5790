/* The scattering's elementwise steps on a CPU, each in one pass over memory (models/scatter_kernels.py builds
 * this file; models/fast_scattering.py uses it only where a probe finds PyTorch's own operations' bits).
 *
 * Complex maps are interleaved (real, imaginary) float32 pairs. A wavelet filter is real in the Fourier domain and
 * is stored with each value twice, beside the pair it multiplies, so that every product is one contiguous run of
 * float products. The arithmetic is PyTorch's, operation by operation: a complex product by a real filter is the
 * product of each part (PyTorch's complex product adds the other part times 0: the same for finite values; a
 * pair with one non-finite part stays half finite here, and the FFT that follows makes its map non-finite either
 * way), sums are taken in the order PyTorch takes them, and only the squared modulus is fused (PyTorch's addcmul
 * is). Built with -ffp-contract=off: the compiler may not fuse anything else.
 */
#include <math.h>
#include <stdint.h>

/* out[b, l] = sum over the factor x factor blocks t (row-major) of spectrum[b, block t] * filters[t, l].
 * spectrum: (batch, rows, cols) complex; filters: (factor^2, angles, rows / factor, 2 cols / factor);
 * out: (batch, angles, rows / factor, cols / factor) complex. */
void periodized_product(const float *spectrum, const float *filters, float *out, int64_t batch, int64_t rows,
                        int64_t cols, int64_t angles, int64_t factor, int threads) {
    const int64_t height = rows / factor, pairs = 2 * (cols / factor), blocks = factor * factor;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t l = 0; l < angles; l++) {
            float *target = out + (b * angles + l) * height * pairs;
            for (int64_t t = 0; t < blocks; t++) {
                const float *source = spectrum + 2 * (b * rows + (t / factor) * height) * cols + (t % factor) * pairs;
                const float *filter = filters + (t * angles + l) * height * pairs;
                for (int64_t u = 0; u < height; u++) {
                    const float *s = source + 2 * u * cols, *f = filter + u * pairs;
                    float *o = target + u * pairs;
                    if (t == 0)
                        for (int64_t v = 0; v < pairs; v++) o[v] = s[v] * f[v];
                    else
                        for (int64_t v = 0; v < pairs; v++) o[v] = o[v] + s[v] * f[v];
                }
            }
        }
    }
}

/* One value of the sum over l of grad[l * step + v] * filters[l * step + v]: in a group of 16, a running sum;
 * otherwise PyTorch's row_sum, four running sums of every fourth l, the remainder added to the first. */
static float product_sum(const float *grad, const float *filters, int64_t step, int64_t angles, int64_t v,
                         int in_groups) {
    if (in_groups) {
        float total = 0.0f;
        for (int64_t l = 0; l < angles; l++) total = total + grad[l * step + v] * filters[l * step + v];
        return total;
    }
    float partial[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t whole = angles / 4;
    for (int64_t i = 0; i < whole; i++)
        for (int64_t k = 0; k < 4; k++) {
            const int64_t at = (4 * i + k) * step + v;
            partial[k] = partial[k] + grad[at] * filters[at];
        }
    for (int64_t l = 4 * whole; l < angles; l++) partial[0] = partial[0] + grad[l * step + v] * filters[l * step + v];
    return ((partial[0] + partial[1]) + partial[2]) + partial[3];
}

/* The spectrum's gradient: block t of out[b] = the sum over l of grad[b, l] * filters[t, l], added in PyTorch's
 * order for a sum over a middle dimension (its CPU sum kernel, AVX2): a running sum from l = 0 at the points of
 * each whole group of 16, and at the last (h w mod 16) points four running sums of every fourth l, then added up
 * in order (its row_sum). Here: products first, then that order; the kernel runs only where a probe agrees. */
void periodized_product_backward(const float *grad, const float *filters, float *out, int64_t batch, int64_t rows,
                                 int64_t cols, int64_t angles, int64_t factor, int threads) {
    const int64_t height = rows / factor, width = cols / factor, pairs = 2 * width, blocks = factor * factor;
    const int64_t step = height * pairs, grouped = (height * width / 16) * 16;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < blocks; t++) {
            float *target = out + 2 * (b * rows + (t / factor) * height) * cols + (t % factor) * pairs;
            const float *g = grad + b * angles * step, *f = filters + t * angles * step;
            for (int64_t u = 0; u < height; u++) {
                float *o = target + 2 * u * cols;
                const int64_t first = u * width;  /* the point index of this row's first value */
                if (first + width <= grouped) {
                    /* every point of the row in a group of 16: one running sum, l by l, vectorizable over v */
                    for (int64_t v = 0; v < pairs; v++) o[v] = g[u * pairs + v] * f[u * pairs + v];
                    for (int64_t l = 1; l < angles; l++)
                        for (int64_t v = 0; v < pairs; v++)
                            o[v] = o[v] + g[l * step + u * pairs + v] * f[l * step + u * pairs + v];
                } else {
                    for (int64_t v = 0; v < pairs; v++)
                        o[v] = product_sum(g, f, step, angles, u * pairs + v, first + v / 2 < grouped);
                }
            }
        }
    }
}

/* out = re^2 + im^2 with one rounding for the second product (PyTorch's addcmul(re.square(), im, im)). */
void squared_modulus(const float *z, float *out, int64_t count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) out[i] = fmaf(z[2 * i + 1], z[2 * i + 1], z[2 * i] * z[2 * i]);
}

/* out = z * q, q = grad / modulus with non-finite quotients 0, plus 0 * grad (a non-finite grad stays NaN). */
void modulus_backward(const float *z, const float *modulus, const float *grad, float *out, int64_t count,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) {
        float quotient = grad[i] / modulus[i];
        if (!isfinite(quotient)) quotient = 0.0f;
        quotient = quotient + 0.0f * grad[i];
        out[2 * i] = z[2 * i] * quotient;
        out[2 * i + 1] = z[2 * i + 1] * quotient;
    }
}
