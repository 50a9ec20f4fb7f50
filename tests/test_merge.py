import copy
import tempfile

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.walk import lora_layers
from tests.conftest import MLP, injected, randomize_adapters, tiny_gpt2


def test_merged_and_unmerged_outputs_agree(case):
    model = injected(case)
    x = case.input()
    unmerged = case.run(model, x)
    lorakit.merge(model)
    assert (case.run(model, x) - unmerged).abs().max() < 1e-5


def test_merge_twice_equals_merge_once(case):
    model = injected(case)
    lorakit.merge(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.merge(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, once[key]), key


def test_unmerge_restores_the_weights(case):
    model = injected(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.merge(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "merge changed no weight"
    lorakit.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    lorakit.unmerge(model)  # a second unmerge is a no-op
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))


def test_merge_and_unload_returns_a_plain_model_with_the_same_outputs(case):
    model = injected(case)
    x = case.input()
    expected = case.run(model, x)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert (case.run(plain, x) - expected).abs().max() < 1e-5
    assert set(plain.state_dict()) == set(case.model().state_dict())


def test_unload_gives_back_the_base_model(case):
    model = injected(case)
    x = case.input()
    plain = lorakit.unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(case.run(plain, x), case.run(case.model(), x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_computed_in_float32(dtype):
    torch.manual_seed(0)
    layer = lorakit.Linear(64, 64, r=8, dtype=dtype)
    randomize_adapters(layer, std=0.05)
    adapter = layer.lora["default"]
    in_float32 = (layer.weight.float() + adapter.scaling * (adapter.lora_B @ adapter.lora_A)).to(dtype)
    exact = layer.weight.double() + adapter.scaling * (adapter.lora_B.double() @ adapter.lora_A.double())
    layer.merge()
    torch.testing.assert_close(layer.weight, in_float32, rtol=0, atol=0)
    # Only the final rounding to the half type is lost: within one unit in the last place.
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((layer.weight.double() - exact).abs() <= ulp).all()


def test_a_non_finite_merge_is_refused_and_nothing_changes():
    model = injected_mlp()
    with torch.no_grad():
        model.fc2.lora["default"].lora_B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.MergeError, match="fc2 would give NaN/Inf"):
        lorakit.merge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))


def test_half_precision_overflow_is_refused():
    layer = lorakit.Linear(4, 4, r=1, dtype=torch.float16)
    with torch.no_grad():
        layer.lora["default"].lora_A.fill_(300.0)
        layer.lora["default"].lora_B.fill_(300.0)
    model = nn.Sequential(layer)
    with pytest.raises(lorakit.MergeError, match="overflows"):
        lorakit.merge(model)


def injected_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    return model


def test_state_dict_merge_needs_no_model_and_equals_the_merged_model(case):
    model = injected(case)
    base_state = copy.deepcopy(case.model().state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        merged_state = lorakit.merge_adapter_into_state_dict(base_state, tmp)
    lorakit.merge(model)
    expected = model.state_dict()
    for key, value in merged_state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def test_state_dict_merge_handles_gpt2_conv1d_square_weights():
    torch.manual_seed(0)
    model = tiny_gpt2()
    base_state = copy.deepcopy(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_proj"]))  # (32, 32) and (128, 32)
    randomize_adapters(model)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        merged_state = lorakit.merge_adapter_into_state_dict(base_state, tmp)
    lorakit.merge(model)
    key = "transformer.h.0.attn.c_proj.weight"
    torch.testing.assert_close(merged_state[key], model.state_dict()[key], rtol=0, atol=1e-6)


def test_state_dict_merge_rejects_a_base_that_does_not_fit():
    model = injected_mlp()
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        with pytest.raises(lorakit.AdapterFileError, match="state dict has no 'fc1.weight'"):
            lorakit.merge_adapter_into_state_dict({"other.weight": torch.zeros(2, 2)}, tmp)
