"""How the ``lorakit`` command's process allocates memory: freed memory is kept for the next step
instead of being handed back to the operating system and faulted in again.

A training step (or an evaluation batch, or a decoding step) frees and re-allocates the same few
hundred MiB of activations every time. glibc's malloc serves blocks above its mmap threshold
(adapted at run time, at most 32 MiB) with a fresh mmap() each and trims the heap's top on free,
so every step touches new pages: on the 2-core VMs this project measures on, `lorakit train` took
30-60 thousand page faults a step, each 10-37 us (first touch of the VM's memory), a fifth of the
run in the kernel (bench/process_memory.py). PyTorch's CPU performance guide recommends jemalloc or
tcmalloc for this; both need LD_PRELOAD before the process starts, so the command asks glibc for
the same policy with mallopt(): no mmap() per block, no trimming. Tensors of 2 MiB and more go on
transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE: one fault per 2 MiB instead of 512), where
the kernel offers them on request.

The price: the process keeps its peak heap until it exits (its peak is what it needed anyway).
Only the command sets this (cli.run); a program that imports lorakit keeps its own policy.
``LORAKIT_KEEP_FREED_MEMORY=0`` leaves glibc's defaults, for comparison or a tight memory budget.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt() parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt() takes (an int): the heap's top is trimmed only above 2 GiB free.
NEVER_TRIM = 2**31 - 1
OPT_OUT = "LORAKIT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Set this process's allocator to keep freed memory for reuse (glibc only; call before the
    first large tensor). Returns whether malloc's policy was changed."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    # PyTorch reads this once, at its first allocation of 2 MiB or more.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS, Windows: their allocators have other knobs; left as they are
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success, 0 on a value it refuses.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def available_memory_bytes(meminfo_path: str = "/proc/meminfo") -> int | None:
    """Memory the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open(meminfo_path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None
