"""What the device multiplies in hardware: the one fact both mixed-precision training (train/precision.py)
and the 4-bit kernel's dispatch (quant/int4_kernel.py) decide on."""

from __future__ import annotations

import functools
import platform

import torch

X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _cpu_multiplies_bfloat16()


@functools.cache  # asked on every 4-bit forward; the CPU does not change under a running process
def _cpu_multiplies_bfloat16() -> bool:
    if platform.machine().lower() in X86_MACHINES:
        # oneDNN's own test (mkldnn._is_mkldnn_bf16_supported) passes on any AVX-512 CPU, where it
        # emulates bfloat16: on an Intel Xeon without AVX512-BF16 a training step took 2.9x
        # float32's time (bench/bf16_cpu.py). Only these two instruction sets multiply it natively.
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    # Arm: oneDNN's test is the CPU's BF16 extension itself.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
