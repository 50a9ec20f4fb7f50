"""The float32 single-row kernel of QuantLinear (int4_gemv.c) against the exact de-quantizing path in
float64; which layers and rows it takes; how it is built and cached."""

import os
import platform
import shutil
import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit.hardware import X86_MACHINES
from lorakit.quant import int4_gemv
from lorakit.quant.int4_gemv import Int4Gemv
from lorakit.quant.int4_kernel import Int4Packed
from lorakit.quant.linear import (
    QuantLinear,
    quantize_linears,
    use_int4_kernel,
    widen_mins,
)

CPU = torch.device("cpu")
CAN_BUILD = (sys.platform == "linux" and platform.machine().lower() in X86_MACHINES
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc") is not None)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="the kernel is built on Linux x86 with AVX2 and a C compiler")


def _layer(out_features=48, in_features=256, group_size=32, bias=True, wide_mins=False):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), 4, group_size).eval()
    return widen_mins(layer) if wide_mins else layer


def _float64_reference(layer, x):
    return torch.nn.functional.linear(x.double(), layer.quantized.dequantize(torch.float64),
                                      None if layer.bias is None else layer.bias.double())


def test_the_kernel_builds_wherever_it_can():
    assert (int4_gemv._library() is not None) == CAN_BUILD


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("wide_mins", [False, True])
@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256)])
def test_one_row_is_multiplied_in_float32_as_de_quantizing_would(group_size, wide_mins, shape):
    layer = _layer(group_size=group_size, bias=group_size != 64, wide_mins=wide_mins)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    assert isinstance(layer._kernels[True][1], Int4Gemv)
    reference = _float64_reference(layer, x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    # float32 rounding in another order of summation; the bfloat16 int4 kernel is ~1e-3 off here
    assert (y.double() - reference).norm() / reference.norm() < 1e-6
    bfloat16 = Int4Packed.from_quantized(layer.quantized).matmul(x).double()
    assert (bfloat16 + (0 if layer.bias is None else layer.bias) - reference).norm() / reference.norm() > 1e-4


@needs_kernel
def test_its_products_do_not_depend_on_the_thread_count():
    layer, x = _layer(out_features=576, in_features=576), torch.randn(1, 576)
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
def test_more_rows_other_widths_and_the_exact_path_leave_it_alone():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 256))
        assert list(layer._kernels) == [False] and isinstance(layer._kernels[False][1], Int4Packed)
        narrow = _layer(in_features=96)  # 96 inputs: not a multiple of the 64 codes it reads at a time
        narrow(torch.randn(96))
        assert isinstance(narrow._kernels[True][1], Int4Packed)  # the int4 kernel takes the row instead
        layer.use_gemv = False
        assert isinstance(layer.kernel_weight(CPU, single_row=True), Int4Packed)
        use_int4_kernel(layer, False)
        assert layer.kernel_weight(CPU, single_row=True) is None
    for bits in (2, 3, 8):
        other = QuantLinear.from_linear(nn.Linear(256, 16), bits, 32)
        assert not int4_gemv.gemv_applies(other.quantized, CPU)


@needs_kernel
def test_a_merge_into_the_mins_reaches_the_kernel():
    model = widen_mins(quantize_linears(nn.Sequential(nn.Linear(128, 64)), 4, 32)).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    torch.manual_seed(1)
    for param in lorakit.lora_parameters(model):
        nn.init.normal_(param, std=0.3)
    x = torch.randn(1, 128)
    with torch.no_grad():
        unmerged = model(x)
        merged_model = lorakit.merge_and_unload(model)
        merged = merged_model(x)
        reference = _float64_reference(merged_model[0], x)
    assert (merged.double() - reference).norm() / reference.norm() < 1e-6
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5  # QA-LoRA merges exactly into the mins


@needs_kernel
def test_a_build_cut_short_leaves_nothing_under_the_librarys_name(tmp_path, monkeypatch):
    fake = tmp_path / "cc"  # writes half a library, then fails, as a compiler killed mid-write would
    fake.write_text('#!/bin/sh\nfor a; do out=$a; done\nprintf "\\177ELF half" > "$out"\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    target = tmp_path / "kernels" / "int4_gemv-test.so"
    assert not int4_gemv._build(target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.delenv("CC")
    assert int4_gemv._build(target) and int4_gemv._private(target)


@needs_kernel
def test_a_library_others_could_have_written_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    int4_gemv._library.cache_clear()
    try:
        assert int4_gemv._library() is not None  # built into the new cache
        (built,) = (tmp_path / "kernels").iterdir()
        os.chmod(built, 0o666)
        int4_gemv._library.cache_clear()
        assert int4_gemv._library() is None  # single rows go to the int4 kernel instead
    finally:
        int4_gemv._library.cache_clear()
