"""kymatio's 2-D scattering transform, computed with fewer and larger operations.

kymatio's torch backend walks the scattering tree path by path: for J = 2 and L = 8 that is 81
paths of about ten small operations each, full complex FFTs of real signals, inverse FFTs at full
resolution that are then subsampled, and copies in every complex product. This module computes the
same coefficients from kymatio's own Morlet filters (``kymatio.scattering2d.filter_bank``) and its
own reflection padding, one scale at a time, every orientation of a scale in one batched operation:

- a wavelet step multiplies the spectrum by all L filters of a scale at once and subsamples in the
  Fourier domain by periodization (kymatio's ``subsample_fourier``: the sum of the k x k blocks of
  the spectrum, divided by k^2), folded into the product: k^2 block products, never the full one;
- the modulus is one autograd function (the root of the summed squares) whose gradient is zero where
  the modulus is zero (kymatio's ``ModulusStable``);
- the final low-pass step (filter phi, subsampling by 2^(J - j), kymatio's unpadding) is a fixed
  real linear map of each real map: phi is a Gaussian, separable, so the step is two small real
  matrix products, ``rows @ U @ cols^T``, instead of an FFT, a product, a periodization and an
  inverse FFT per path.

On a CPU in float32, the periodized products, the moduli and their backward passes run as compiled kernels
(``models.scatter_kernels``), one pass over memory each instead of PyTorch's several, with PyTorch's arithmetic:
a process uses them only after a probe has found them equal to the operations below to the bit, so the
coefficients and gradients do not depend on whether they run (without a C compiler they do not; one line says so).

Coefficients are those of ``ScatteringTorch2D(J, shape, L)`` in kymatio's channel order (order 0,
order 1 by scale then angle, order 2 by first path then second path) to float32 rounding. The
filters depend on the image shape only and are built once per (shape, device, dtype) by the caller.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from kymatio.scattering2d.backend.torch_backend import Pad
from kymatio.scattering2d.filter_bank import filter_bank
from kymatio.scattering2d.utils import compute_padding

from common.errors import DPImgSynError
import models.scatter_kernels as scatter_kernels

# Image-channels transformed together on a CPU, per intra-op thread (the threads share each operation):
# their largest intermediates (64 second-order maps each) then stay within the caches. Measured on two
# cores against a chunk of 32: at one thread 48-64 took 1.01-1.03 of its time and 192 1.55; at two
# threads 64-160 took 0.89-0.97 forward and 0.94-0.99 forward+backward. The cap is untested beyond two
# threads. On a GPU the whole batch goes at once. Every chunk size gives the same bits.
CPU_CHUNK_PER_THREAD = 32
MAX_CPU_CHUNK = 128


@dataclass(frozen=True)
class MorletBank:
    """Everything the transform of one (shape, device, dtype) needs, built from kymatio's filter bank.

    ``wavelets[j][res]``: the L wavelets of scale j as applied to a map at resolution ``res``
    (subsampled by 2^res), cut into the (2^(j-res))^2 blocks that the periodization adds up and
    already divided by their count; ``interleaved[j][res]``: the same blocks stacked, real, each value twice
    (k^2, L, rows, 2 cols), as the compiled kernels read them; ``low_pass[res]``: (rows, cols) of the low-pass
    step of a map at resolution ``res``.
    """

    scales: int
    pad: Pad
    wavelets: tuple[tuple[tuple[torch.Tensor, ...], ...], ...]
    interleaved: tuple[tuple[torch.Tensor, ...], ...]
    low_pass: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _low_pass_matrix(profile: np.ndarray, step: int) -> np.ndarray:
    """The real map: convolve with the 1-D filter whose DFT is ``profile``, keep every ``step``-th
    sample and drop the first and the last kept one (kymatio's unpadding). Float64."""
    size = len(profile)
    frequencies = np.arange(size)
    dft = np.exp(-2j * np.pi * np.outer(frequencies, frequencies) / size)
    convolution = (dft.conj() @ (profile[:, None] * dft)).real / size
    return convolution[step::step][:-1]


def _separable(filter_2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two 1-D factors of a separable filter (phi is a Gaussian): its best rank-one approximation."""
    left, singular, right = np.linalg.svd(filter_2d.astype(np.float64))
    scale = np.sqrt(singular[0])
    return left[:, 0] * scale, right[0] * scale


@functools.lru_cache(maxsize=16)
def _filter_bank(padded: tuple[int, int], scales: int, angles: int) -> dict:
    """kymatio's filters in the Fourier domain (NumPy), built once per process: a second each at 64 pixels."""
    return filter_bank(*padded, scales, angles)


def build_bank(shape: tuple[int, int], scales: int, angles: int, device: torch.device,
               dtype: torch.dtype) -> MorletBank:
    """The filters of ``ScatteringTorch2D(J=scales, shape=shape, L=angles)`` for inputs of ``dtype``."""
    height, width = shape
    if 2**scales > min(height, width):
        raise DPImgSynError(f"a scattering with J = {scales} needs images of at least {2**scales} pixels a side, "
                            f"not {height} x {width}; resize the images")
    padded = compute_padding(height, width, scales)
    pad = Pad([(padded[0] - height) // 2, (padded[0] - height + 1) // 2,
               (padded[1] - width) // 2, (padded[1] - width + 1) // 2], [height, width])
    bank = _filter_bank(padded, scales, angles)
    complex_dtype = torch.promote_types(dtype, torch.complex64)

    def tensor(array: np.ndarray, kind: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), device=device).to(kind)

    wavelets, interleaved = [], []
    for scale in range(scales):
        per_resolution, pairs = [], []
        for resolution, _ in enumerate(bank["psi"][scale * angles]["levels"]):
            stacked = np.stack([psi["levels"][resolution] for psi in bank["psi"][scale * angles:(scale + 1) * angles]])
            count = 4 ** (scale - resolution)  # the periodization adds up (2^(scale - resolution))^2 blocks
            blocks = [block / count for block in _split(stacked, count)]
            per_resolution.append(tuple(tensor(block, complex_dtype) for block in blocks))
            pairs.append(tensor(np.repeat(np.stack(blocks).real, 2, axis=-1), dtype))
        wavelets.append(tuple(per_resolution))
        interleaved.append(tuple(pairs))
    low_pass = []
    for resolution, level in enumerate(bank["phi"]["levels"]):
        profiles = _separable(level)
        step = 2 ** (scales - resolution)
        low_pass.append(tuple(tensor(_low_pass_matrix(profile, step), dtype) for profile in profiles))
    return MorletBank(scales, pad, tuple(wavelets), tuple(interleaved), tuple(low_pass))


class _Modulus(torch.autograd.Function):
    """|z| of a complex tensor, with gradient zero where |z| = 0 (kymatio's ``ModulusStable``).

    The backward pass finds those points by the quotient, not by comparing |z| with 0 (on a CPU a comparison
    and a masked fill took three times the rest of this backward): grad / |z| is infinite or NaN there,
    ``nan_to_num_`` makes it 0, and adding ``0 * grad`` leaves a non-finite incoming gradient NaN. Where
    |z| is so small (subnormal) that the quotient overflows, the gradient is 0 too, where kymatio's is infinite.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor) -> torch.Tensor:
        kernels = _kernels_for(z)
        return (_squared_modulus(z) if kernels is None else scatter_kernels.squared_modulus(kernels, z)).sqrt_()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        z, modulus = ctx.saved_tensors
        kernels = _kernels_for(z, modulus, grad)
        if kernels is None:
            return _modulus_backward(z, modulus, grad)
        return scatter_kernels.modulus_backward(kernels, z, modulus, grad)


class _PeriodizedProduct(torch.autograd.Function):
    """``periodize(spectrum[..., None, :, :] * filters, k)`` from the filters' k x k blocks (already divided
    by k^2): (..., H, W) -> (..., L, H/k, W/k), accumulated in place, never the full product.

    The backward pass writes each block of the spectrum's gradient once (autograd's own would zero-fill
    and add up k^2 full-size gradients). The filters are constants, real in the Fourier domain (kymatio
    drops their imaginary part), so they need no conjugate. ``interleaved`` holds the same blocks for the
    compiled kernels.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spectrum: torch.Tensor, interleaved: torch.Tensor, *blocks: torch.Tensor) -> torch.Tensor:
        kernels = _kernels_for(spectrum, interleaved)
        if kernels is None:
            return _periodized_product(spectrum, blocks)
        return scatter_kernels.periodized_product(kernels, spectrum, interleaved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.interleaved, ctx.blocks = inputs[1], inputs[2:]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernels = _kernels_for(grad, ctx.interleaved) if grad.shape[-3] <= scatter_kernels.MAX_SUMMED_ANGLES else None
        if kernels is None:
            spectrum_grad = _periodized_product_backward(grad, ctx.blocks)
        else:
            spectrum_grad = scatter_kernels.periodized_product_backward(kernels, grad, ctx.interleaved)
        return (spectrum_grad, *[None] * (1 + len(ctx.blocks)))


# PyTorch's operations for the steps that the compiled kernels also do; the kernels must give their bits.
def _squared_modulus(z: torch.Tensor) -> torch.Tensor:
    parts = torch.view_as_real(z)
    return torch.addcmul(parts[..., 0].square(), parts[..., 1], parts[..., 1])


def _modulus_backward(z: torch.Tensor, modulus: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return z * (grad / modulus).nan_to_num_(0.0, 0.0, 0.0).add_(grad, alpha=0)


def _periodized_product(spectrum: torch.Tensor, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    spectrum = spectrum.unsqueeze(-3)
    total = None
    for part, block in zip(_split(spectrum, len(blocks)), blocks):
        total = part * block if total is None else total.addcmul_(part, block)
    return total


def _periodized_product_backward(grad: torch.Tensor, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    factor = math.isqrt(len(blocks))
    parts = [(grad * block).sum(-3) for block in blocks]
    return torch.cat([torch.cat(parts[i * factor:(i + 1) * factor], -1) for i in range(factor)], -2)


_operations_only = False


@contextlib.contextmanager
def pytorch_operations_only() -> Iterator[None]:
    """Within the block, PyTorch's operations even where the kernels apply (benchmarks and tests compare both)."""
    global _operations_only
    previous, _operations_only = _operations_only, True
    try:
        yield
    finally:
        _operations_only = previous


def _kernels_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The compiled kernels where they apply: plain float32 / complex64 CPU tensors, outside torch.func's
    transforms (whose wrapped tensors have no memory of their own) and without a pending conjugation."""
    plain = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.complex64) and not t.is_conj()
                and not t.is_neg() and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    return _checked_kernels() if plain and not _operations_only else None


@functools.lru_cache(maxsize=1)
def _checked_kernels() -> ctypes.CDLL | None:
    """The kernels, once per process, if they build and give PyTorch's bits on a probe; else a warning saying why."""
    kernels = scatter_kernels.load()
    if not isinstance(kernels, str) and not _agrees_with_pytorch(kernels):
        kernels = "they differ from PyTorch's operations on this machine"
    if isinstance(kernels, str):  # on stderr and in a stage's log
        logging.getLogger("dpimgsyn").warning("the scattering's compiled CPU kernels are not used (%s); PyTorch's "
                                              "operations give the same coefficients, more slowly", kernels)
        return None
    return kernels


def _agrees_with_pytorch(kernels: ctypes.CDLL) -> bool:
    """Each kernel against the operations above, to the bit, on random maps: moduli with zeros and a non-finite
    gradient (NaN where PyTorch gives NaN); periodized products of 8, 5 and 16 orientations, of 1 and 2 x 2
    blocks, on 30 points a block (a group of 16 and 14 more: both orders of the gradient's sum)."""
    generator = torch.Generator().manual_seed(0)

    def same(first: torch.Tensor, second: torch.Tensor) -> bool:
        first, second = (torch.view_as_real(t) if t.is_complex() else t for t in (first, second))
        return torch.equal(first.isnan(), second.isnan()) and torch.equal(first.nan_to_num(), second.nan_to_num())

    z = torch.randn(3, 2, 4, 6, dtype=torch.complex64, generator=generator)
    z[0, 0] = 0
    grad = torch.randn(z.shape, generator=generator)
    grad[1, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    modulus = _squared_modulus(z).sqrt_()
    agree = same(scatter_kernels.squared_modulus(kernels, z), _squared_modulus(z)) and same(
        scatter_kernels.modulus_backward(kernels, z, modulus, grad), _modulus_backward(z, modulus, grad))
    for angles, factor in ((8, 2), (5, 1), (scatter_kernels.MAX_SUMMED_ANGLES, 1)):
        blocks = tuple(torch.randn(angles, 5, 6, generator=generator).to(torch.complex64) for _ in range(factor**2))
        interleaved = torch.stack([block.real for block in blocks]).repeat_interleave(2, -1)
        spectrum = torch.randn(3, 5 * factor, 6 * factor, dtype=torch.complex64, generator=generator)
        product_grad = torch.randn(3, angles, 5, 6, dtype=torch.complex64, generator=generator)
        agree = agree and same(scatter_kernels.periodized_product(kernels, spectrum, interleaved),
                               _periodized_product(spectrum, blocks)) and same(
            scatter_kernels.periodized_product_backward(kernels, product_grad, interleaved),
            _periodized_product_backward(product_grad, blocks))
    return agree


def _split(spectra, count: int) -> list:
    """The k x k blocks (k^2 = count) of the last two dimensions of a tensor or array, row-major, as views."""
    factor = math.isqrt(count)
    rows, cols = spectra.shape[-2] // factor, spectra.shape[-1] // factor
    return [spectra[..., i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            for i in range(factor) for j in range(factor)]


def _wavelet_modulus(spectrum: torch.Tensor, bank: MorletBank, scale: int, resolution: int) -> torch.Tensor:
    """|ifft2(periodize(spectrum * psi))| for the L wavelets of ``scale`` applied at ``resolution``:
    (..., H, W) -> (..., L, H/k, W/k)."""
    product = _PeriodizedProduct.apply(spectrum, bank.interleaved[scale][resolution], *bank.wavelets[scale][resolution])
    return _Modulus.apply(torch.fft.ifft2(product))


def _low_pass(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ maps @ cols^T`` as two plain matrix products, returned transposed: (..., w, h).

    Both products multiply a contiguous batch of matrices on the right (one large matrix product each,
    forward and backward); a broadcast product on the left would run matrix by matrix.
    """
    return (maps @ cols.mT).mT.contiguous() @ rows.mT


def _scatter(images: torch.Tensor, bank: MorletBank) -> torch.Tensor:
    """(n, H, W) -> (n, paths, H', W'); see the module's docstring."""
    padded = bank.pad(images)[..., 0]
    spectrum = torch.fft.fft2(padded)
    outputs = [_low_pass(padded, *bank.low_pass[0]).unsqueeze(1)]
    first = [_wavelet_modulus(spectrum, bank, scale, 0) for scale in range(bank.scales)]
    outputs += [_low_pass(maps, *bank.low_pass[scale]) for scale, maps in enumerate(first)]
    for scale, maps in enumerate(first[:-1]):
        maps_spectrum = torch.fft.fft2(maps)
        second = [_wavelet_modulus(maps_spectrum, bank, later, scale)
                  for later in range(scale + 1, bank.scales)]
        coefficients = [_low_pass(block, *bank.low_pass[later]) for later, block in enumerate(second, scale + 1)]
        outputs.append(torch.cat(coefficients, 2).flatten(1, 2))  # first-path-major, as kymatio orders them
    return torch.cat(outputs, 1).mT


def scattering(images: torch.Tensor, bank: MorletBank) -> torch.Tensor:
    """The scattering of every channel: (B, C, H, W) -> (B, C, paths, H / 2^J, W / 2^J), kymatio's layout."""
    batch_shape = images.shape[:-2]
    flat = images.reshape(-1, *images.shape[-2:])
    if flat.device.type == "cpu":
        chunk = min(CPU_CHUNK_PER_THREAD * torch.get_num_threads(), MAX_CPU_CHUNK)
    else:
        chunk = max(len(flat), 1)
    # An empty batch (an empty Poisson draw) gets its shape from one zero image: FFTs refuse empty inputs.
    parts = flat.split(chunk) if len(flat) else [flat.new_zeros(1, *flat.shape[1:])]
    with torch.autocast(flat.device.type, enabled=False):  # the low-pass products stay in the input's precision
        coefficients = torch.cat([_scatter(part, bank) for part in parts])[:len(flat)]
    return coefficients.reshape(*batch_shape, *coefficients.shape[1:])
