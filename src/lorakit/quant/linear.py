"""A Linear layer over a group-wise quantized weight: without gradients 4-bit layers multiply with
lorakit's float32 kernels (int4_float32.py) up to FLOAT32_MAX_ROWS rows of input (one row only where
the CPU multiplies bfloat16 in hardware) and with PyTorch's int4 kernel (int4_kernel.py) beyond,
each where it exists and pays; every other case de-quantizes on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.hardware import native_bfloat16
from lorakit.quant import int4_float32
from lorakit.quant.groupwise import QuantizedWeight, quantize_weight
from lorakit.quant.int4_float32 import (
    FLOAT32_MAX_ROWS,
    Int4Gemm,
    Int4Gemv,
    gemm_applies,
    gemv_applies,
)
from lorakit.quant.int4_kernel import Int4Packed, kernel_available, kernel_pays
from lorakit.quant.int8_head import Int8GridHead

KernelForm = Int4Gemv | Int4Gemm | Int4Packed
# Which kernels may multiply how many rows, fastest first: the first whose form applies does. Where
# the CPU multiplies bfloat16 in hardware, PyTorch's int4 kernel is faster than lorakit's float32
# one from a few rows on (a SmolLM2 layer's seven products on a 2-core AMD EPYC Zen 4: 1 row 0.28
# against 0.26 ms, 4 rows 0.36 against 0.45, 16 rows 1.1 against 1.5, 128 rows 7.6 against 9.4).
_ONE_ROW, _FEW_ROWS, _MORE_ROWS = ("gemv", "gemm", "int4"), ("gemm", "int4"), ("int4",)
_FEW_ROWS_NATIVE_BFLOAT16 = ("int4", "gemm")


class QuantLinear(nn.Module):
    """y = x W~^T + b, W~ = scale * q + min per group; codes, scales and mins are buffers (frozen).

    Without autograd (inference), ``use_kernel`` (default True) lets forward multiply with a kernel
    straight from the codes where one applies: one row with lorakit's one-row float32 kernel, up to
    FLOAT32_MAX_ROWS with its few-row one (both unless ``use_float32_kernels`` is False; where the
    CPU multiplies bfloat16 in hardware, PyTorch's int4 kernel takes these first), more with
    PyTorch's int4 kernel (bfloat16 arithmetic) where it pays (``kernel_pays``: on a CPU that
    emulates bfloat16, long inputs de-quantize). ``use_kernel=False`` keeps the exact de-quantizing
    path, the float32 reference. With autograd (training) forward always de-quantizes: trained with
    the int4 kernel's bfloat16 forward, the orders QA-LoRA adapter scored 70.0% instead of 75.5%
    (docs/ARCHITECTURE.md).
    A kernel's form of the weight is built on first use and rebuilt whenever codes, scales or mins
    change (a merge shifts the mins) or move."""

    use_kernel = True
    use_float32_kernels = True

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("codes", weight.codes)  # (out, in * bits / 8) uint8
        self.register_buffer("scales", weight.scales)  # (out, in / group_size)
        self.register_buffer("mins", weight.mins)  # (out, in / group_size)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        # kernel -> (what its form was built from, the weight in that form, or None where it does not apply)
        self._kernels: dict[str, tuple[tuple, KernelForm | None]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                    min_dtype: torch.dtype = torch.float16) -> QuantLinear:
        weight = quantize_weight(linear.weight, bits, group_size, min_dtype=min_dtype)
        return cls(weight, linear.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.mins, self.bits, self.group_size,
                               (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            if x.requires_grad:
                return _DequantizedLinear.apply(x, self.quantized, self.bias)
        elif (kernel := self.kernel_weight(x.device, x.numel() // self.in_features)) is not None:
            y = kernel.matmul(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, dequantized(self.quantized, product_dtype(x)), self.bias)

    def kernel_weight(self, device: torch.device, rows: int) -> KernelForm | None:
        """The weight in the form of the kernel that multiplies ``rows`` rows of input on ``device``,
        or None where forward de-quantizes instead."""
        if rows == 1:
            kinds = _ONE_ROW
        elif rows <= FLOAT32_MAX_ROWS:
            kinds = _FEW_ROWS_NATIVE_BFLOAT16 if native_bfloat16(device) else _FEW_ROWS
        else:
            kinds = _MORE_ROWS
        for kind in kinds:
            if kind == "int4" and not kernel_pays(rows, device):
                continue
            if (form := self._kernel_form(kind, device)) is not None:
                return form
        return None

    def _kernel_form(self, kind: str, device: torch.device) -> KernelForm | None:
        # Checked on every kernel product of decoding, so the buffers are read from their dict
        # (Module.__getattr__ costs ~1 us a look-up; 1.07x tokens/s at batch 1 for SmolLM2). A form
        # is (re)built, or found not to apply, only when something in ``source`` changed.
        buffers = self._buffers
        codes, scales, mins = buffers["codes"], buffers["scales"], buffers["mins"]
        source = (device, self.use_kernel, self.use_float32_kernels, codes.data_ptr(), codes._version,
                  scales.data_ptr(), scales._version, mins.data_ptr(), mins._version)
        cached = self._kernels.get(kind)
        if cached is None or cached[0] != source:
            self._kernels[kind] = cached = (source, self._build_kernel_form(kind, device))
        return cached[1]

    def _build_kernel_form(self, kind: str, device: torch.device) -> KernelForm | None:
        quantized = self.quantized
        if not (self.use_kernel and quantized.codes.device == device):
            return None
        if kind == "int4":
            return Int4Packed.from_quantized(quantized) if kernel_available(quantized, device) else None
        if not self.use_float32_kernels:
            return None
        if kind == "gemv":
            return Int4Gemv(quantized) if gemv_applies(quantized, device) else None
        return Int4Gemm(quantized) if gemm_applies(quantized, device) else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, mins={str(self.mins.dtype).removeprefix('torch.')}")


def dequantized(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``weight.dequantize(dtype)``: for 4-bit weights on the CPU by lorakit's one-pass kernel (the same
    values bit for bit, 2-3x faster: QA-LoRA training de-quantizes every layer in forward and again in
    backward), else PyTorch's."""
    fast = int4_float32.dequantize(weight, dtype)
    return fast if fast is not None else weight.dequantize(dtype)


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x W~^T is multiplied in: autocast's where it is on (float64 aside, which autocast
    leaves), else x's. De-quantizing straight to it gives the weight autocast would make of a float32
    one (dequantize rounds once), without writing that float32 weight first and casting it after."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


class _DequantizedLinear(torch.autograd.Function):
    """x W~^T + b with the gradient for x only (W~ and b are frozen). Backward de-quantizes W~
    again instead of keeping it from forward: training then holds the packed weights, never a
    float copy of every layer's weight for the whole backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # packed codes, scales and mins: the buffers themselves, nothing copied
        return F.linear(x, dequantized(weight, product_dtype(x)), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantized(ctx.weight, grad.dtype), None, None


def quantize_linears(model: nn.Module, bits: int = 4, group_size: int = 32, skip: tuple[str, ...] = ("lm_head",),
                     min_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every nn.Linear (except names ending in ``skip``) by a QuantLinear, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith(skip):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, QuantLinear.from_linear(module, bits, group_size, min_dtype))
    return model


def widen_mins(model: nn.Module) -> nn.Module:
    """Store every QuantLinear's mins in float32 (in place): a QA-LoRA merge then shifts them without
    rounding to float16. The values, and so the model's output, do not change."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.mins = module.mins.float()
    return model


def use_int4_kernel(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let every QuantLinear in ``model`` multiply with its kernels, and an Int8GridHead from its
    8-bit codes; or keep the exact de-quantizing path and the float head (the float32 reference)
    with ``enabled=False``; in place."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, Int8GridHead)):
            module.use_kernel = enabled
    return model
