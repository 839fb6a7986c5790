"""The scattering's elementwise steps as compiled CPU kernels (``scatter_kernels.c``), one pass over memory each.

PyTorch runs the scattering's complex arithmetic one operation at a time: a periodized product is k^2 passes
over its output, the modulus three, their backward passes four or more, and ``torch.compile`` does not fuse
around complex tensors. These four kernels do each step in one pass with PyTorch's own arithmetic, so that the
coefficients and gradients stay the same to the bit (``models.fast_scattering`` checks that on a probe before
it uses them, and keeps PyTorch's operations otherwise).

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``), for this CPU, into the
cache folder (``common.files.cache_root()/kernels``), keyed by the source, the flags, the compiler and the CPU;
later processes load it (a fraction of a second to build). Each kernel runs on PyTorch's thread count, in its
OpenMP runtime where that is GNU's (as in PyTorch's pip wheels: the same ``libgomp.so.1``). Without a compiler, or
where building or loading fails, ``load`` returns the reason instead and nothing else changes.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from common.files import cache_root

SOURCE = Path(__file__).with_name("scatter_kernels.c")
KERNEL_FOLDER = "kernels"
# -march=native: built on the machine that runs it (the CPU is part of the key); -ffp-contract=off: no fused
# multiply-adds beyond the one written (PyTorch's bits).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
# The gradient's sum over orientations follows PyTorch's order up to 16 terms (beyond, its sum regroups them).
MAX_SUMMED_ANGLES = 16

_POINTER, _COUNT, _THREADS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "periodized_product": [_POINTER, _POINTER, _POINTER, _COUNT, _COUNT, _COUNT, _COUNT, _COUNT, _THREADS],
    "periodized_product_backward": [_POINTER, _POINTER, _POINTER, _COUNT, _COUNT, _COUNT, _COUNT, _COUNT, _THREADS],
    "squared_modulus": [_POINTER, _POINTER, _COUNT, _THREADS],
    "modulus_backward": [_POINTER, _POINTER, _POINTER, _POINTER, _COUNT, _THREADS],
}


def load() -> ctypes.CDLL | str:
    """The compiled kernels, built first if this source, compiler and CPU have none yet; else why not (one line)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return f"no C compiler '{compiler}'"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, platform.machine(),
                                        _cpu_features()]).encode()).hexdigest()[:24]
        folder = cache_root() / KERNEL_FOLDER
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        library = folder / f"scatter_kernels-{key}.so"
        if not library.exists():
            _build(compiler, library)
        loaded = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        lines = str(error).strip().splitlines()
        return f"building or loading them failed: {lines[-1] if lines else type(error).__name__}"
    for name, arguments in _SIGNATURES.items():
        getattr(loaded, name).argtypes = arguments
        getattr(loaded, name).restype = None
    return loaded


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the processor's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build(compiler: str, library: Path) -> None:
    """Compile beside the target and rename into place: processes building at once each finish whole."""
    partial = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(done.stderr or f"{compiler} exited with status {done.returncode}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


# Each wrapper takes CPU tensors of PyTorch's layout (complex64 maps, float32 filters and real maps) and no
# pending conjugation; ``contiguous`` gives the kernels plain row-major memory.
def periodized_product(library: ctypes.CDLL, spectrum: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(..., H, W) complex, filters (k^2, L, H/k, 2 W/k) -> (..., L, H/k, W/k) complex."""
    spectrum, filters = spectrum.contiguous(), filters.contiguous()
    rows, cols = spectrum.shape[-2:]
    angles, height, pairs = filters.shape[1:]
    out = spectrum.new_empty(*spectrum.shape[:-2], angles, height, pairs // 2)
    library.periodized_product(spectrum.data_ptr(), filters.data_ptr(), out.data_ptr(),
                               spectrum.numel() // (rows * cols), rows, cols, angles, rows // height,
                               torch.get_num_threads())
    return out


def periodized_product_backward(library: ctypes.CDLL, grad: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(..., L, H/k, W/k) complex -> (..., H, W) complex: the gradient of ``periodized_product``'s spectrum."""
    grad, filters = grad.contiguous(), filters.contiguous()
    factor = math.isqrt(filters.shape[0])
    angles, height, width = grad.shape[-3:]
    out = grad.new_empty(*grad.shape[:-3], height * factor, width * factor)
    library.periodized_product_backward(grad.data_ptr(), filters.data_ptr(), out.data_ptr(),
                                        grad.numel() // (angles * height * width), height * factor, width * factor,
                                        angles, factor, torch.get_num_threads())
    return out


def squared_modulus(library: ctypes.CDLL, z: torch.Tensor) -> torch.Tensor:
    """|z|^2 of a complex64 tensor, as float32."""
    z = z.contiguous()
    out = torch.empty(z.shape, dtype=torch.float32)
    library.squared_modulus(z.data_ptr(), out.data_ptr(), z.numel(), torch.get_num_threads())
    return out


def modulus_backward(library: ctypes.CDLL, z: torch.Tensor, modulus: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The modulus's input gradient: z * grad / |z|, 0 where |z| = 0, NaN where grad is not finite."""
    z, modulus, grad = z.contiguous(), modulus.contiguous(), grad.contiguous()
    out = torch.empty_like(z)
    library.modulus_backward(z.data_ptr(), modulus.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(),
                             torch.get_num_threads())
    return out
