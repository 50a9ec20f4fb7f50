"""lorakit's float32 4-bit kernels (int4_float32.c: one row, and a few) against the exact
de-quantizing path in float64; which layers and row counts they take; how they are built and cached."""


import pytest
import torch
from torch import nn

import lorakit
from lorakit.quant import int4_float32, int4_kernel
from lorakit.quant import linear as quant_linear
from lorakit.quant.groupwise import quantize_weight
from lorakit.quant.int4_float32 import FLOAT32_MAX_ROWS, Int4Gemm, Int4Gemv
from lorakit.quant.int4_kernel import Int4Packed, kernel_available
from lorakit.quant.linear import (
    QuantLinear,
    quantize_linears,
    use_int4_kernel,
    widen_mins,
)
from tests.conftest import randomize_adapters
from tests.quant.buildable import CAN_BUILD, needs_kernel

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _bfloat16_emulated(monkeypatch):
    """As on a CPU without bfloat16 arithmetic, where these kernels take up to FLOAT32_MAX_ROWS rows
    (with it, PyTorch's int4 kernel takes 2 and more: tested below)."""
    monkeypatch.setattr(quant_linear, "native_bfloat16", lambda device: False)


def _layer(out_features=48, in_features=256, group_size=32, bias=True, wide_mins=False):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), 4, group_size).eval()
    return widen_mins(layer) if wide_mins else layer


def _float64_reference(layer, x):
    return torch.nn.functional.linear(x.double(), layer.quantized.dequantize(torch.float64),
                                      None if layer.bias is None else layer.bias.double())


def test_the_kernel_builds_wherever_it_can():
    assert (int4_float32._library() is not None) == CAN_BUILD


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("wide_mins", [False, True])
@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256), (2, 256), (3, 5, 256), (FLOAT32_MAX_ROWS, 256)])
def test_rows_are_multiplied_in_float32_as_de_quantizing_would(group_size, wide_mins, shape):
    layer = _layer(group_size=group_size, bias=group_size != 64, wide_mins=wide_mins)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    one_row = x.numel() == 256
    assert isinstance(layer._kernels["gemv" if one_row else "gemm"][1], Int4Gemv if one_row else Int4Gemm)
    reference = _float64_reference(layer, x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    # float32 rounding in another order of summation; the bfloat16 int4 kernel is ~1e-3 off here
    assert (y.double() - reference).norm() / reference.norm() < 1e-6
    bfloat16 = Int4Packed.from_quantized(layer.quantized).matmul(x).double()
    assert (bfloat16 + (0 if layer.bias is None else layer.bias) - reference).norm() / reference.norm() > 1e-4


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("min_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_pass_de_quantization_is_pytorchs_bit_for_bit(group_size, min_dtype, dtype):
    torch.manual_seed(0)
    weight = quantize_weight(torch.randn(40, 384) * 0.05, 4, group_size, min_dtype=min_dtype)
    fast = int4_float32.dequantize(weight, dtype)
    assert fast.dtype == dtype and torch.equal(fast, weight.dequantize(dtype))
    assert int4_float32.dequantize(weight, torch.float64) is None  # computed in float64 there
    assert int4_float32.dequantize(quantize_weight(torch.randn(8, 64), 3, 32), dtype) is None


@needs_kernel
def test_training_through_a_4_bit_layer_takes_the_same_gradients():
    layer = _layer(group_size=64)
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).square().sum().backward()  # de-quantizes in forward and again in backward
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, layer.quantized.dequantize(), layer.bias).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)  # PyTorch's de-quantized weight, the same bits both times


@needs_kernel
def test_no_rows_and_the_wrong_width_are_handled_before_the_kernels():
    layer = _layer()
    with torch.no_grad():
        assert layer(torch.randn(0, 256)).shape == (0, 48)
        assert layer(torch.randn(2, 0, 256)).shape == (2, 0, 48)
        for wrong in (torch.randn(1, 512), torch.randn(2, 128), torch.randn(512)):  # the row count comes out whole
            with pytest.raises(ValueError, match="takes 256"):
                layer(wrong)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 7, 13])  # one row; a run of 2; runs of 4 + 3; of 5 + 4 + 4
def test_products_do_not_depend_on_the_thread_count(rows):
    layer, x = _layer(out_features=576, in_features=576), torch.randn(rows, 576)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            alone = layer(x)
            torch.set_num_threads(max(2, threads))
            shared = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)  # each output is summed by one thread, in one order


@needs_kernel
def test_each_row_count_takes_its_kernel_and_the_others_are_left_alone():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(FLOAT32_MAX_ROWS + 1, 256))  # beyond them: de-quantizes, or the int4 kernel
        assert "gemm" not in layer._kernels and "gemv" not in layer._kernels
        narrow = _layer(in_features=96)  # 96 inputs: not a multiple of the 64 codes the one-row kernel reads
        narrow(torch.randn(96))
        assert narrow._kernels["gemv"][1] is None and isinstance(narrow._kernels["gemm"][1], Int4Gemm)
        layer.use_float32_kernels = False
        assert isinstance(layer.kernel_weight(CPU, 1), Int4Packed)  # PyTorch's int4 kernel, as before
        use_int4_kernel(layer, False)
        assert layer.kernel_weight(CPU, 1) is None
        assert _layer(out_features=12).kernel_weight(CPU, 2) is None  # the few-row one takes rows 8 at a time
    for bits in (2, 3, 8):
        other = QuantLinear.from_linear(nn.Linear(256, 16), bits, 32)
        assert not int4_float32.gemv_applies(other.quantized, CPU)
        assert not int4_float32.gemm_applies(other.quantized, CPU)


@needs_kernel
@pytest.mark.skipif(not kernel_available(_layer().quantized, CPU), reason="PyTorch's int4 kernel is not in this build")
def test_where_bfloat16_is_native_its_int4_kernel_takes_two_rows_and_more(monkeypatch):
    for module in (quant_linear, int4_kernel):
        monkeypatch.setattr(module, "native_bfloat16", lambda device: True)
    layer = _layer()
    assert isinstance(layer.kernel_weight(CPU, 1), Int4Gemv)  # one row: lorakit's, as fast and exact
    for rows in (2, FLOAT32_MAX_ROWS, FLOAT32_MAX_ROWS + 1):
        assert isinstance(layer.kernel_weight(CPU, rows), Int4Packed)
    # 24 outputs: the int4 kernel packs them 16 at a time and does not apply; lorakit's few-row one does
    assert isinstance(_layer(out_features=24).kernel_weight(CPU, 2), Int4Gemm)


@needs_kernel
def test_a_merge_into_the_mins_reaches_the_kernel():
    model = widen_mins(quantize_linears(nn.Sequential(nn.Linear(128, 64)), 4, 32)).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    randomize_adapters(model, std=0.3)
    x = torch.randn(3, 128)
    with torch.no_grad():
        unmerged = model(x)
        merged_model = lorakit.merge_and_unload(model)
        merged = merged_model(x)
        reference = _float64_reference(merged_model[0], x)
        merged_row = merged_model(x[:1])
    assert (merged.double() - reference).norm() / reference.norm() < 1e-6
    assert (merged_row.double() - reference[:1]).norm() / reference[:1].norm() < 1e-6
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5  # QA-LoRA merges exactly into the mins


