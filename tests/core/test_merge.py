import copy
import tempfile

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer, ModulesToSave
from lorakit.core.walk import lora_layers
from tests.conftest import (
    CASES,
    MLP,
    as_peft_writes_it,
    injected,
    randomize_adapters,
    tiny_gpt2,
)

CASE = {case.name: case for case in CASES}


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


class GPT2WithProjection(nn.Module):
    """GPT-2 (Conv1D layers, stored (in, out)) and a square nn.Linear (stored (out, in)) side by side:
    one adapter over both must transpose the first kind only."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = tiny_gpt2()
        self.projection = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.gpt2(ids).logits[..., :32])


@pytest.mark.parametrize("build, targets", [
    (GPT2WithProjection, ["c_attn", "c_proj", "c_fc", "projection"]),  # Conv1D (square c_proj) and square Linear
    (CASE["llama"].build, CASE["llama"].targets),  # with the embedding
    (CASE["cnn"].build, CASE["cnn"].targets),
    (CASE["embedding"].build, CASE["embedding"].targets),
])
def test_the_state_dict_merge_and_the_model_merge_write_identical_weights(build, targets, tmp_path):
    torch.manual_seed(0)
    model = build()
    base_state = copy.deepcopy(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, tmp_path)
    from_file = lorakit.merge_adapter_into_state_dict(base_state, tmp_path)
    from_model = lorakit.merge_and_unload(model).state_dict()
    assert from_file.keys() == from_model.keys()
    changed = [key for key in from_file if not torch.equal(from_file[key], base_state[key])]
    assert changed
    for key in from_file:
        assert torch.equal(from_file[key], from_model[key]), key


def test_a_peft_file_with_one_fan_in_fan_out_flag_is_refused_on_a_square_layer(tmp_path):
    torch.manual_seed(0)
    model = GPT2WithProjection()
    base_state = copy.deepcopy(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn", "projection"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    as_peft_writes_it(tmp_path)  # PEFT's file says only fan_in_fan_out: true, for every layer
    with pytest.raises(lorakit.AdapterFileError, match="projection is square"):
        lorakit.merge_adapter_into_state_dict(base_state, tmp_path)
    torch.manual_seed(0)  # the same base again
    model = GPT2WithProjection()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "conv1d-only")
    as_peft_writes_it(tmp_path / "conv1d-only")  # c_attn (32, 96) is not square: its shape decides
    merged = lorakit.merge_adapter_into_state_dict(base_state, tmp_path / "conv1d-only")
    expected = lorakit.merge_and_unload(model).state_dict()
    key = "gpt2.transformer.h.0.attn.c_attn.weight"
    assert torch.equal(merged[key], expected[key])


# --- low precision: unmerge is exact, and several adapters round once ---------------------------------


def _bf16_model(adapters=("a",)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    for i, name in enumerate(adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]), name=name)
        randomize_adapters(model, seed=i, std=0.05)
    return model


def test_a_bf16_merge_then_unmerge_gives_the_original_weights_back_bit_for_bit():
    model = _bf16_model()
    before = [layer.weight.detach().clone() for _, layer in lora_layers(model)]
    lorakit.merge(model)
    assert not all(torch.equal(b, layer.weight) for b, (_, layer) in zip(before, lora_layers(model), strict=True))
    assert not any("unmerged" in key for key in model.state_dict())  # the kept copy is never saved
    lorakit.unmerge(model)
    for b, (_, layer) in zip(before, lora_layers(model), strict=True):
        assert torch.equal(b, layer.weight)
    assert not any("unmerged" in name for name, _ in model.named_buffers())  # and is let go


def test_ten_disable_enable_cycles_leave_a_merged_bf16_model_bit_identical():
    model = _bf16_model()
    lorakit.merge(model)
    merged = [layer.weight.detach().clone() for _, layer in lora_layers(model)]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for _ in range(10):
        with lorakit.disable_adapters(model):
            model(x)
    for m, (_, layer) in zip(merged, lora_layers(model), strict=True):
        assert torch.equal(m, layer.weight)


def test_several_adapters_merged_into_bf16_are_rounded_once():
    model = _bf16_model(adapters=("a", "b"))
    _, layer = next(iter(lora_layers(model)))
    once = layer.weight.float() + (layer._delta_weight(layer.lora["a"]) + layer._delta_weight(layer.lora["b"]))
    lorakit.set_adapter(model, ["a", "b"])
    layer.merge(["a"])  # two calls, as a user adding a second adapter later would
    layer.merge(["b"])
    assert torch.equal(layer.weight, once.to(torch.bfloat16))
