"""lorakit's C kernels (quant/*.c): compiled once per machine with the system's C compiler into
``$LORAKIT_CACHE/kernels`` and loaded with ctypes, where the platform can run them.

Why lorakit compiles its own rather than taking a library: docs/ARCHITECTURE.md. A library is named
by its source's digest (a changed source builds anew) and by its own bytes' digest, checked before
every load: loading a damaged shared object crashes the process instead of failing.
"""

from __future__ import annotations

import ctypes
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

# -fopenmp: the parallel loops bind to libgomp, which PyTorch has loaded already (the same soname).
# -ffp-contract=off: a product then a sum stays two roundings where the C says so (int4_dequantize
# matches PyTorch's bit for bit); the matrix products ask for FMA explicitly.
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


def platform_supported() -> bool:
    """Whether the kernels can run here: Linux on x86 with AVX2, PyTorch on OpenMP (whose libgomp they use)."""
    return (sys.platform == "linux" and platform.machine().lower() in X86_MACHINES
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and "parallel backend: OpenMP" in torch.__config__.parallel_info())


# A C function's signature for ctypes: (argument types, return type).
POINTER, INT = ctypes.c_void_p, ctypes.c_int
Signature = tuple[list, type | None]


def load_library(source: Path, signatures: dict[str, Signature]) -> ctypes.CDLL | None:
    """``source`` built (once per machine and version of it) and loaded, its functions given
    ``signatures``; None where it cannot be: not a supported platform, no compiler, an unwritable
    cache, or a library another account could write."""
    if not platform_supported():
        return None
    source_digest = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    directory, prefix = cache_root() / "kernels", f"{source.stem}-{source_digest}-"
    built = verified(directory, prefix) or build(source, directory, prefix)
    if built is None or not private(built):
        return None
    library = ctypes.CDLL(str(built))
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def float32_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as contiguous float32 rows (rows, in), as the kernels read it."""
    # The kernels trust the row count and width they are given: a wider x would have them write
    # past the end of y.
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension; this layer takes {in_features}")
    rows = x.reshape(-1, in_features)
    return rows if rows.dtype == torch.float32 and rows.is_contiguous() else rows.float().contiguous()


def verified(directory: Path, prefix: str) -> Path | None:
    """A library built from this source whose bytes match the digest in its name. Loading a damaged
    one (say, cut short by a power cut after its rename reached the disk and before its data did)
    would crash the process, not fail, so one that does not match is removed and never loaded."""
    for path in sorted(directory.glob(f"{prefix}*.so")):
        try:
            if digest(path) == path.stem.removeprefix(prefix):
                return path
            path.unlink()
        except OSError:
            continue
    return None


def build(source: Path, directory: Path, prefix: str) -> Path | None:
    """Compile ``source`` into ``directory``: into a temporary file, renamed once whole to ``prefix`` +
    its bytes' digest, so that a build cut short (or two at once) never leaves a partial library under
    a name that is loaded. None where there is no compiler, it fails, or the directory is not writable."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{prefix}", suffix=".tmp")
    except OSError:
        return None
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", partial], check=False, capture_output=True,
                              timeout=120)
        if done.returncode != 0:
            return None
        built = directory / f"{prefix}{digest(Path(partial))}.so"
        os.replace(partial, built)
        return built
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        Path(partial).unlink(missing_ok=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def private(path: Path) -> bool:
    """Whether ``path`` is this user's and writable by no one else: loading a library runs its code,
    so one that another account could have replaced is not loaded."""
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & 0o022
