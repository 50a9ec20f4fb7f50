"""W~ x for a single row x, in float32 straight from 4-bit codes (int4_gemv.c), on x86 CPUs with AVX2.

Decoding one sequence multiplies every weight by one row. There PyTorch's CPU int4 kernel
(int4_kernel.py) is held back on CPUs without bfloat16 arithmetic: it converts x to bfloat16 and
scales every weight. int4_gemv.c multiplies the integer codes by float32 x and applies each group's
scale once, to its dot product: on a 2-core AMD EPYC (AVX2) 23 against 43 us for 576 -> 576 and
51-53 against 87-88 us for SmolLM2's 576 -> 1536 and 1536 -> 576 products, and in float32, so its
products match the de-quantizing path to ~1e-6 (the bfloat16 kernel's differ by ~1e-2).

PyTorch ships no such kernel for the CPU, nor does a library that installs beside torch 2.13
(docs/ARCHITECTURE.md), so lorakit compiles its own: once per machine, with the system's C
compiler, into ``$LORAKIT_CACHE/kernels``; ~0.3 s. Where that cannot be done (no compiler, not
Linux on x86 with AVX2, PyTorch not on OpenMP), single rows use the int4 kernel as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.cache import cache_root
from lorakit.hardware import X86_MACHINES
from lorakit.quant.groupwise import QuantizedWeight

SOURCE = Path(__file__).with_name("int4_gemv.c")
# -fopenmp: the parallel loop binds to libgomp, which PyTorch has loaded already (the same soname).
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
K_MULTIPLE = 64  # the kernel reads codes 64 at a time


def gemv_applies(weight: QuantizedWeight, device: torch.device) -> bool:
    """Whether ``weight`` (4-bit) can be multiplied on ``device`` by the single-row kernel."""
    return (device.type == "cpu" and weight.bits == 4 and weight.shape[1] % K_MULTIPLE == 0
            and weight.group_size % 32 == 0 and _library() is not None)


class Int4Gemv:
    """A QuantizedWeight as the kernel reads it: the packed codes themselves (no copy), scales and
    mins (out, in / group_size) as float32 (the QuantizedWeight's own tensors where they are)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.codes = weight.codes.contiguous()
        self.scales = weight.scales.float().contiguous()
        self.mins = weight.mins.float().contiguous()
        # Held by this object, so their addresses stay valid; read once (a product costs ~20 us at
        # 576 x 576, and every microsecond around it shows at decoding's 210 products a token).
        self._addresses = (self.codes.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) with one row -> (..., out) in x's dtype, computed in float32."""
        flat = x.reshape(-1)  # (in,)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)  # float32
        status = _library().int4_gemv(flat.data_ptr(), self.in_features, *self._addresses, self.out_features,
                                      self.group_size, y.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"int4_gemv could not allocate {self.in_features} floats of scratch")
        return y.to(x.dtype)


@functools.cache  # built or found once per process
def _library() -> ctypes.CDLL | None:
    if not (sys.platform == "linux" and platform.machine().lower() in X86_MACHINES
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and "parallel backend: OpenMP" in torch.__config__.parallel_info()):
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    built = cache_root() / "kernels" / f"int4_gemv-{digest}.so"
    if not built.is_file() and not _build(built):
        return None
    if not _private(built):
        return None
    library = ctypes.CDLL(str(built))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.int4_gemv.argtypes = [pointer, integer, pointer, pointer, pointer, integer, integer, pointer, integer]
    library.int4_gemv.restype = integer
    return library


def _build(target: Path) -> bool:
    """Compile SOURCE into ``target``: into a temporary file beside it, renamed over it once whole,
    so that a build cut short (or two at once) never leaves a partial library under the name."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], check=False, capture_output=True,
                              timeout=120)
        if done.returncode != 0:
            return False
        os.replace(partial, target)
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        Path(partial).unlink(missing_ok=True)


def _private(path: Path) -> bool:
    """Whether ``path`` is this user's and writable by no one else: loading a library runs its code,
    so one that another account could have replaced is not loaded."""
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & 0o022
