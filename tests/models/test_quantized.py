"""Whole quantized models: saved and loaded back unchanged, loaded as bases, trained through."""

import json

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.models.base import BaseModelError, load_base
from lorakit.models.quantized import (
    QUANT_CONFIG,
    QuantSpec,
    is_quantized_directory,
    load_quantized,
    save_quantized,
)
from lorakit.models.quantized import quantized_spec as spec_of
from lorakit.quant.linear import QuantLinear, quantize_linears, widen_mins

IDS = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits", [3, 4])
def test_a_saved_quantized_model_loads_back_with_the_same_weights_and_logits(tiny_base_dir, tmp_path, bits):
    model, tokenizer = load_base(tiny_base_dir, quant=QuantSpec(bits, 32))
    save_quantized(model, tokenizer, tmp_path / "q")
    assert is_quantized_directory(tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert spec_of(loaded) == QuantSpec(bits, 32)
    saved = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    for key, tensor in loaded.state_dict().items():
        if key in saved:
            assert torch.equal(tensor, saved[key]), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie is restored, not stored twice
    assert torch.equal(_logits(loaded), _logits(model))
    assert json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())["bits"] == bits


def test_quantizing_a_base_replaces_every_linear_but_the_head(tiny_base_dir):
    model, _ = load_base(tiny_base_dir, quant=QuantSpec(4, 32))
    floats, _ = load_base(tiny_base_dir)
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 and not isinstance(model.lm_head, QuantLinear)
    for name in quantized:  # every weight within half a quantization step (plus the min's float16 rounding)
        layer, dense = model.get_submodule(name), floats.get_submodule(name).weight
        error = (layer.quantized.dequantize() - dense).abs().view(*layer.scales.shape, -1)
        assert (error <= layer.scales.float()[..., None] / 2 + 1e-3 * dense.abs().max()).all(), name


def test_a_quantized_directory_refuses_another_spec(tiny_base_dir, tmp_path):
    save_quantized(*load_base(tiny_base_dir, quant=QuantSpec(4, 32)), tmp_path / "q")
    assert spec_of(load_base(tmp_path / "q")[0]) == QuantSpec(4, 32)
    assert spec_of(load_base(tmp_path / "q", quant=QuantSpec(4, 32))[0]) == QuantSpec(4, 32)
    with pytest.raises(BaseModelError, match="is quantized 4-bit, groups of 32, not 2-bit"):
        load_base(tmp_path / "q", quant=QuantSpec(2, 32))


def test_bad_specs_and_float_models_are_clear_errors(tiny_base_dir, tmp_path):
    with pytest.raises(ConfigError, match="group"):
        QuantSpec(4, 48)
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(5, 32)
    with pytest.raises(ConfigError, match="group"):  # hidden size 32 cannot be cut into groups of 64
        load_base(tiny_base_dir, quant=QuantSpec(4, 64))
    with pytest.raises(ConfigError, match="no quantized layers"):
        save_quantized(*load_base(tiny_base_dir), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_model_mixing_specs_is_refused(tiny_base_dir):
    model, _ = load_base(tiny_base_dir)
    quantize_linears(model.model.layers[0], bits=4)
    quantize_linears(model.model.layers[1], bits=2)
    with pytest.raises(ConfigError, match="mixes quantization specs"):
        spec_of(model)


def test_the_backward_pass_gives_the_dense_layers_input_gradient():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 16), bits=3, group_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    dense_x = x.detach().clone().requires_grad_()
    weights = torch.randn(5, 16)
    (layer(x) * weights).sum().backward()
    (F.linear(dense_x, layer.quantized.dequantize(), layer.bias) * weights).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_widening_the_mins_keeps_the_values(tiny_base_dir, tmp_path):
    model, tokenizer = load_base(tiny_base_dir, quant=QuantSpec(4, 32))
    before = _logits(model)
    widen_mins(model)
    assert model.model.layers[0].mlp.up_proj.mins.dtype == torch.float32
    assert torch.equal(_logits(model), before)
    save_quantized(model, tokenizer, tmp_path / "q")
    assert load_quantized(tmp_path / "q")[0].model.layers[0].mlp.up_proj.mins.dtype == torch.float32
