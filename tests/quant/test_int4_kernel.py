"""The int4 kernel path of QuantLinear against the exact de-quantizing path: same weights, bfloat16
arithmetic; rebuilt when a merge moves the mins; nothing of it saved; gradients still exact."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.quant import int4_kernel
from lorakit.quant.groupwise import quantize_weight
from lorakit.quant.int4_kernel import (
    EMULATED_BFLOAT16_MAX_ROWS,
    Int4Packed,
    kernel_available,
)
from lorakit.quant.linear import QuantLinear, quantize_linears, use_int4_kernel

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _bfloat16_kernel_only(monkeypatch):
    """These tests are about PyTorch's int4 kernel: lorakit's float32 kernels (test_int4_float32.py)
    would take their row counts first."""
    monkeypatch.setattr(QuantLinear, "use_float32_kernels", False)


def _layer(out_features=48, in_features=128, group_size=32, bits=4, bias=True):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), bits, group_size)


def _exact(layer, x):
    return torch.nn.functional.linear(x, layer.quantized.dequantize(x.dtype), layer.bias)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_computes_the_same_weights_in_bfloat16(group_size, bias):
    layer = _layer(group_size=group_size, bias=bias).eval()
    x = torch.randn(3, 5, 128)  # any leading shape
    with torch.no_grad():
        fast = layer(x)
        exact = _exact(layer, x)
    assert layer._kernels["int4"][1] is not None  # the kernel did run
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    error = (fast - exact).norm() / exact.norm()
    assert 0 < error < 1e-2  # bfloat16 rounding (2^-9 relative per value), not a different weight
    wrong_zero = Int4Packed.from_quantized(layer.quantized)
    wrong_zero.scale_and_zero[..., 1] -= 8 * wrong_zero.scale_and_zero[..., 0]  # the min taken for the zero
    with torch.no_grad():
        assert (wrong_zero.matmul(x) - exact).norm() / exact.norm() > 10 * error


@pytest.mark.parametrize("native", [True, False])
def test_where_bfloat16_is_emulated_a_prompt_pass_de_quantizes_and_decoding_takes_the_kernel(native, monkeypatch):
    monkeypatch.setattr(int4_kernel, "native_bfloat16", lambda device: native)
    layer = _layer().eval()
    decoding, prompt = torch.randn(EMULATED_BFLOAT16_MAX_ROWS, 1, 128), torch.randn(2, EMULATED_BFLOAT16_MAX_ROWS, 128)
    with torch.no_grad():
        kernel = layer.kernel_weight(CPU, EMULATED_BFLOAT16_MAX_ROWS)
        assert torch.equal(layer(decoding), kernel.matmul(decoding) + layer.bias)
        assert torch.equal(layer(prompt), (kernel.matmul(prompt) + layer.bias) if native else _exact(layer, prompt))
        assert not torch.equal(kernel.matmul(prompt), _exact(layer, prompt) - layer.bias)  # the two paths differ


def test_only_4_bit_groups_the_kernel_takes_use_it():
    for bits in (2, 3, 8):
        layer = _layer(bits=bits)
        assert not kernel_available(layer.quantized, CPU) and layer.kernel_weight(CPU, 1) is None
    assert _layer(out_features=8).kernel_weight(CPU, 1) is None  # the packing takes rows 16 at a time
    layer = use_int4_kernel(quantize_linears(nn.Sequential(nn.Linear(64, 16)), 4, 32), False)[0]
    assert layer.kernel_weight(CPU, 1) is None  # the exact path, when asked for
    assert not kernel_available(layer.quantized, torch.device("meta"))


def test_the_kernels_copy_is_rebuilt_when_a_merge_moves_the_mins_and_is_never_saved():
    model = quantize_linears(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), 4, 32).eval()
    state_keys = set(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
    torch.manual_seed(1)
    for param in lorakit.lora_parameters(model):
        nn.init.normal_(param, std=0.3)
    x = torch.randn(4, 64)
    with torch.no_grad():
        unmerged = model(x)
        before = model[0].kernel_weight(CPU, 4)
        lorakit.merge(model)
        merged = model(x)
        assert model[0].kernel_weight(CPU, 4) is not before  # rebuilt from the shifted mins
        use_int4_kernel(model, False)
        exact_merged = model(x)
    assert (merged - unmerged).norm() / unmerged.norm() < 2e-2
    assert (merged - exact_merged).norm() / exact_merged.norm() < 2e-2
    plain = lorakit.merge_and_unload(model)
    assert set(plain.state_dict()) == state_keys  # the kernel's copy is not a buffer
    packed = use_int4_kernel(plain)[0].kernel_weight(CPU, 1)
    kernel_bytes = packed.codes.numel() + packed.scale_and_zero.numel() * 2
    assert kernel_bytes <= plain[0].quantized.nbytes  # as large as the packed codes, not a float weight


def test_the_kernels_copy_follows_buffers_loaded_in_place_or_replaced():
    layer, other = _layer().eval(), _layer(bias=False)  # the same weight, until other's rows are swapped
    with torch.no_grad():
        other.codes.copy_(other.codes.flip(0))
    x = torch.randn(2, 128)

    def error() -> float:  # the kernel against the exact path on the layer's buffers as they are now
        return float((layer(x) - _exact(layer, x)).norm() / _exact(layer, x).norm())

    with torch.no_grad():
        assert error() < 1e-2  # builds the kernel's copy
        layer.load_state_dict(other.state_dict(), strict=False)  # written into the same buffer tensors
        assert error() < 1e-2
        layer.mins = layer.mins + 0.5  # a new tensor in the buffer's place
        assert error() < 1e-2
        assert not torch.equal(layer.codes, _layer().codes)  # the weight did change


def test_training_computes_on_the_exact_path():
    """With autograd the layer is the float32 reference, forward and backward, whatever use_kernel says."""
    layer = _layer()
    x = torch.randn(6, 128, requires_grad=True)
    grad_out = torch.randn(6, 48)
    y = layer(x)
    y.backward(grad_out)
    assert torch.equal(y, _exact(layer, x.detach()))
    torch.testing.assert_close(x.grad, grad_out @ layer.quantized.dequantize())
    assert torch.equal(layer(x.detach()), y.detach())  # grad enabled, input without grad: exact too
    with torch.no_grad():
        assert not torch.equal(layer(x), y)  # inference: the kernel


def test_a_bfloat16_model_gets_bfloat16_out():
    layer = _layer().to(torch.bfloat16)
    with torch.no_grad():
        y = layer(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_the_weight_matches_the_quantizer_grid_it_came_from():
    """Packing through the kernel's layout keeps every code: an identity input reads each weight back."""
    torch.manual_seed(2)
    weight = torch.randn(16, 64)
    layer = QuantLinear(quantize_weight(weight, 4, 32)).eval()
    with torch.no_grad():
        read_back = layer(torch.eye(64)).T  # (out, in): column i of W~
    exact = layer.quantized.dequantize()
    step = layer.scales.float().repeat_interleave(32, dim=1)
    assert ((read_back - exact).abs() <= step / 16 + exact.abs() / 128).all()  # within bf16, far below a step


def test_under_autocast_it_multiplies_the_weight_autocast_would_make_of_the_float32_one():
    """De-quantized straight to bfloat16: the same output, forward and backward, as the float32 weight
    cast by autocast."""
    layer = _layer()
    x = torch.randn(6, 128, requires_grad=True)
    grad_out = torch.randn(6, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = _exact(layer, x)  # the float32 weight, cast by autocast
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    grad = torch.autograd.grad(y, x, grad_out.to(y.dtype))[0]
    expected_grad = torch.autograd.grad(expected, x, grad_out.to(y.dtype))[0]
    assert torch.equal(grad, expected_grad)
