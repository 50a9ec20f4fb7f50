"""Group-wise quantization: codes pack losslessly, de-quantization is within half a step of the
weight, and bad settings are clear errors."""

import pytest
import torch

import lorakit
from lorakit.quant.groupwise import BITS, pack_codes, quantize_weight, unpack_codes


@pytest.mark.parametrize("bits", BITS)
def test_codes_pack_and_unpack_losslessly(bits):
    codes = torch.randint(0, 1 << bits, (5, 128), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.shape == (5, 128 * bits // 8) and packed.dtype == torch.uint8  # no padding bits
    assert torch.equal(unpack_codes(packed, bits, 128), codes.to(torch.uint8))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", BITS)
def test_dequantized_weights_are_within_half_a_step(bits, group_size):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    exact = quantize_weight(weight, bits, group_size, scale_dtype=torch.float32, min_dtype=torch.float32)
    groups = weight.view(48, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / ((1 << bits) - 1)  # (out, n_groups)
    error = (exact.dequantize() - weight).abs().view(48, -1, group_size).amax(-1)
    assert (error <= 0.5 * step * (1 + 1e-5) + 1e-7).all()
    assert error.max() > 0.25 * step.max()  # it is a real quantization, not a copy

    half = quantize_weight(weight, bits, group_size)  # fp16 scales and mins: a little looser
    error16 = (half.dequantize() - weight).abs().view(48, -1, group_size).amax(-1)
    assert (error16 <= 0.5 * step + (1 << bits) * step * 2**-10 + weight.abs().max() * 2**-10).all()


@pytest.mark.parametrize("bits", BITS)
def test_a_half_precision_weight_is_the_float32_one_rounded_once(bits):
    weight = quantize_weight(torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)), bits, 32)
    wide = weight.dequantize(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(weight.dequantize(dtype), wide.to(dtype))  # what autocast makes of the float32 one
    assert torch.equal(weight.dequantize(torch.float64), wide.double())  # float32's values, exactly


def test_four_bit_weights_take_under_a_fifth_of_float32():
    weight = torch.randn(576, 1536)
    q = quantize_weight(weight, 4, 32)
    assert q.nbytes / (weight.numel() * 4) < 0.2  # 4-bit codes + fp16 scale and min per 32: 5 bits a weight


def test_a_constant_group_is_exact():
    weight = torch.full((2, 32), 0.75)
    assert torch.equal(quantize_weight(weight, 4, 32).dequantize(), weight)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"bits": 5}, "bits=5"),
    ({"group_size": 48}, "group_size=48"),
    ({"weight": torch.zeros(4, 96), "group_size": 64}, "96 inputs"),
    ({"weight": torch.zeros(4, 2, 32)}, "shape"),
])
def test_bad_settings_are_clear_errors(kwargs, words):
    weight = kwargs.pop("weight", torch.zeros(4, 64))
    with pytest.raises(lorakit.ConfigError, match=words):
        quantize_weight(weight, **kwargs)
