"""The batched scattering (models/fast_scattering.py) against kymatio's own transform, the reference."""
from __future__ import annotations

import functools
import logging
import shutil

import pytest
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

import models.fast_scattering as fast_scattering
from models import scatter_kernels
from models.fast_scattering import build_bank, scattering
from models.scatter import Scattering

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the CPU kernels")

pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def kymatio(shape: tuple[int, int], scales: int = 2, dtype: torch.dtype = torch.float32) -> ScatteringTorch2D:
    return ScatteringTorch2D(J=scales, shape=shape, L=8).to(dtype)


def assert_relative(fast: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    assert fast.shape == reference.shape
    error = ((fast - reference).abs().max() / reference.abs().max()).item()
    assert error <= tolerance, f"largest difference {error:.2e} of the largest coefficient"


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("side", [28, 32, 48, 64])
def test_the_coefficients_are_kymatios_in_its_channel_order(side, channels):
    images = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(side + channels))
    reference = kymatio((side, side))(images).flatten(1, 2)  # (B, C * 81, side / 4, side / 4)
    with torch.no_grad():
        assert_relative(Scattering()(images), reference, 1e-5)


@pytest.mark.parametrize("scales, shape", [(1, (20, 24)), (3, (29, 32))])
def test_other_scales_and_odd_or_oblong_shapes_match_too(scales, shape):
    images = torch.randn(2, *shape, generator=torch.Generator().manual_seed(scales))
    bank = build_bank(shape, scales, 8, images.device, images.dtype)
    assert_relative(scattering(images, bank), kymatio(shape, scales)(images), 1e-5)


def test_gradients_pass_gradcheck_in_float64():
    images = torch.randn(1, 2, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bank = build_bank((12, 16), 2, 8, images.device, images.dtype)
    assert torch.autograd.gradcheck(lambda x: scattering(x, bank), images.requires_grad_(), fast_mode=True)


def test_the_input_gradient_is_kymatios_and_zero_where_the_modulus_is():
    """Synthesis differentiates through the transform; an all-zero image makes every wavelet response 0."""
    images = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    images[1] = 0
    weights = torch.randn(3, 2 * 81, 8, 8, generator=torch.Generator().manual_seed(2))
    gradients = []
    for transform in (Scattering(), lambda x: kymatio((32, 32))(x).flatten(1, 2)):
        pixels = images.clone().requires_grad_()
        (transform(pixels) * weights).sum().backward()
        gradients.append(pixels.grad)
    fast, reference = gradients
    assert torch.isfinite(fast).all()
    assert_relative(fast, reference, 1e-5)


def test_the_modulus_gradient_is_zero_at_zero_and_leaves_a_nan_gradient_nan():
    """Zero points are found by the quotient grad / |z|; that must not also turn a NaN gradient into 0."""
    z = torch.tensor([0j, 3 + 4j, 1e-30 + 0j, 3 + 4j, 0j], requires_grad=True)  # |1e-30|^2 underflows: |z| = 0
    modulus = fast_scattering._Modulus.apply(z)
    assert modulus.tolist() == [0.0, 5.0, 0.0, 5.0, 0.0]
    modulus.backward(torch.tensor([1.0, 10.0, 1.0, float("nan"), 0.0]))
    gradient = torch.view_as_real(z.grad)
    assert gradient[[0, 2, 4]].eq(0).all()
    torch.testing.assert_close(gradient[1], torch.tensor([6.0, 8.0]))  # 10 * z / |z|
    assert gradient[3].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_example_gradients_under_torch_func_match_one_backward_per_example(dtype):
    """torch.func's vmap of grad (per-example machinery) runs through the transform (kymatio's does not); in
    float32 its wrapped tensors take PyTorch's operations, the plain backward the compiled kernels."""
    frontend = Scattering()
    images = torch.randn(2, 1, 28, 28, dtype=dtype, generator=torch.Generator().manual_seed(3))

    def loss(image: torch.Tensor) -> torch.Tensor:
        return frontend(image.unsqueeze(0)).square().mean()

    batched = torch.func.vmap(torch.func.grad(loss))(images)
    for image, gradient in zip(images, batched):
        pixels = image.clone().requires_grad_()
        loss(pixels).backward()
        tolerance = dict(rtol=1e-10, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(gradient, pixels.grad, **tolerance)


def test_filters_are_built_once_per_shape_device_and_dtype(monkeypatch):
    built = []
    monkeypatch.setattr("models.scatter.build_bank", lambda *args: built.append(args) or build_bank(*args))
    frontend = Scattering()
    with torch.no_grad():
        for images in (torch.randn(2, 1, 28, 28), torch.randn(5, 3, 28, 28), torch.randn(1, 1, 32, 32),
                       torch.randn(1, 1, 28, 28, dtype=torch.float64), torch.randn(1, 1, 28, 28).half()):
            frontend(images)
    assert [(args[0], args[-1]) for args in built] == [
        ((28, 28), torch.float32), ((32, 32), torch.float32), ((28, 28), torch.float64)]  # half runs in float32
    assert list(frontend.state_dict()) == [] and list(frontend.buffers()) == []


def test_autocast_leaves_the_transform_in_float32():
    """Synthesis and students may run the model under bf16 autocast; the features stay float32, as kymatio's."""
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    frontend = Scattering()
    with torch.no_grad():
        plain = frontend(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = frontend(images)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_an_empty_batch_gets_an_empty_output_of_the_right_shape():
    """An empty Poisson batch reaches a model trained whole on images (kymatio's FFTs refuse it)."""
    assert Scattering()(torch.randn(0, 3, 28, 28)).shape == (0, 3 * 81, 7, 7)


def test_cpu_chunks_give_the_coefficients_and_gradients_of_one_pass_to_the_bit(monkeypatch):
    """The chunk size follows the thread count: it must not change a coefficient or a gradient."""
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(3, 3, 81, 7, 7, generator=torch.Generator().manual_seed(5))
    bank = build_bank((28, 28), 2, 8, images.device, images.dtype)
    results = []
    for per_thread in (32, 2):  # one pass of 9 image-channels, then chunks of 2 (one thread here)
        monkeypatch.setattr(fast_scattering, "CPU_CHUNK_PER_THREAD", per_thread)
        pixels = images.clone().requires_grad_()
        coefficients = scattering(pixels, bank)
        (coefficients * weights).sum().backward()
        results.append((coefficients.detach(), pixels.grad))
    (whole, whole_grad), (chunked, chunked_grad) = results
    assert torch.equal(chunked, whole) and torch.equal(chunked_grad, whole_grad)


def test_cpu_chunks_grow_with_the_threads_up_to_a_cap(monkeypatch):
    seen = []
    monkeypatch.setattr(fast_scattering, "_scatter", lambda part, bank: seen.append(len(part)) or part[:, None])
    images = torch.zeros(300, 1, 8, 8)
    for threads, largest in ((1, 32), (2, 64), (8, fast_scattering.MAX_CPU_CHUNK)):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        seen.clear()
        scattering(images, None)
        assert max(seen) == largest and sum(seen) == 300


def _coefficients_and_gradients(images: torch.Tensor, scales: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    bank = build_bank(tuple(images.shape[-2:]), scales, 8, images.device, images.dtype)
    weights = torch.randn(*images.shape[:-2], 1 + 8 * scales + 32 * scales * (scales - 1), *(
        side // 2**scales for side in images.shape[-2:]), generator=torch.Generator().manual_seed(7))
    pixels = images.clone().requires_grad_()
    coefficients = scattering(pixels, bank)
    (coefficients * weights).sum().backward()
    return coefficients.detach(), pixels.grad


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, scales", [((1, 28, 28), 2), ((3, 32, 32), 2), ((3, 64, 64), 2), ((1, 20, 24), 1),
                                           ((3, 29, 32), 3)])
def test_the_compiled_kernels_give_pytorchs_coefficients_and_gradients_to_the_bit(shape, scales, threads):
    """Every scatter_cnn figure was measured with PyTorch's operations: the kernels must not move a bit."""
    assert fast_scattering._checked_kernels() is not None, "the kernels build here but disagree with PyTorch"
    torch.set_num_threads(threads)
    images = torch.randn(3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    images[1] = 0  # every wavelet response 0: the modulus's gradient there
    with_kernels = _coefficients_and_gradients(images, scales)
    with fast_scattering.pytorch_operations_only():
        with_operations = _coefficients_and_gradients(images, scales)
    for kernels, operations in zip(with_kernels, with_operations):
        assert torch.equal(kernels, operations)


@needs_compiler
def test_the_probe_refuses_kernels_that_round_otherwise(monkeypatch, tmp_path):
    """Built letting the compiler fuse each product into its sum (one rounding instead of two), the kernels are
    close to PyTorch's operations but not equal: the probe must see it, or a faster build could move the bits."""
    monkeypatch.setenv("DPIMGSYN_CACHE", str(tmp_path))
    assert fast_scattering._agrees_with_pytorch(scatter_kernels.load())
    monkeypatch.setattr(scatter_kernels, "FLAGS", tuple(
        "-ffp-contract=fast" if flag == "-ffp-contract=off" else flag for flag in scatter_kernels.FLAGS))
    fused = scatter_kernels.load()
    assert not isinstance(fused, str) and not fast_scattering._agrees_with_pytorch(fused)
    assert len(list((tmp_path / scatter_kernels.KERNEL_FOLDER).glob("*.so"))) == 2  # one build per flags


def test_without_a_compiler_the_transform_says_so_once_and_runs_on_pytorchs_operations(monkeypatch, tmp_path,
                                                                                        caplog):
    monkeypatch.setenv("DPIMGSYN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(fast_scattering, "_checked_kernels", functools.lru_cache(maxsize=1)(
        fast_scattering._checked_kernels.__wrapped__))
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    with caplog.at_level(logging.WARNING, logger="dpimgsyn"):
        _, gradient = _coefficients_and_gradients(images)
        _coefficients_and_gradients(images)
    assert [record.getMessage() for record in caplog.records] == [
        f"the scattering's compiled CPU kernels are not used (no C compiler '{tmp_path / 'no-such-cc'}'); PyTorch's "
        f"operations give the same coefficients, more slowly"]
    assert fast_scattering._checked_kernels() is None and torch.isfinite(gradient).all()
    monkeypatch.setenv("CC", "false")  # a compiler that fails: the reason is the build's
    assert scatter_kernels.load().startswith("building or loading them failed")
