"""DoRA in lorakit's own terms: merge and unmerge exact, mixed with plain LoRA in a layer and in a
batch's rows, the state-dict merge equal to the model merge, and clear refusals."""

import copy
import tempfile

import pytest
import torch

import lorakit
from lorakit.core.walk import lora_layers
from lorakit.errors import ConfigError
from lorakit.rows import rows_use_adapters
from tests.conftest import EmbeddingModel, randomize_adapters, tiny_llama
from tests.test_peft_parity_variants import DORA_CASES, randomize_dora

LLAMA = DORA_CASES[3]


def dora_model(case, dtype=torch.float32):
    model = case.model().to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=case.targets, use_dora=True))
    randomize_dora(model)
    return model


@pytest.mark.parametrize("case", DORA_CASES, ids=[c.name for c in DORA_CASES])
def test_merging_dora_gives_the_unmerged_output_and_unmerging_the_weights_back_bit_for_bit(case):
    model = dora_model(case)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = case.input()
    unmerged = case.run(model, x)
    lorakit.merge(model)
    torch.testing.assert_close(case.run(model, x), unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_a_dora_and_a_plain_adapter_active_together_merge_to_their_unmerged_output():
    model = dora_model(LLAMA)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="plain")
    randomize_adapters(model, seed=7)  # also A and B of the DoRA adapter; its m stays
    lorakit.set_adapter(model, ["default", "plain"])
    x = LLAMA.input()
    both = LLAMA.run(model, x)
    lorakit.set_adapter(model, "default")
    assert (LLAMA.run(model, x) - both).abs().max() > 1e-3  # the plain adapter counts
    lorakit.set_adapter(model, ["default", "plain"])
    lorakit.merge(model)
    torch.testing.assert_close(LLAMA.run(model, x), both, rtol=1e-5, atol=1e-5)


def test_state_dict_merge_of_a_dora_file_equals_the_model_merge():
    model = dora_model(LLAMA)
    base_state = copy.deepcopy(LLAMA.model().state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        merged_state = lorakit.merge_adapter_into_state_dict(base_state, tmp)
    expected = lorakit.merge(model).state_dict()
    for key, value in merged_state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def test_bf16_base_merges_dora_within_one_rounding():
    model = dora_model(LLAMA, torch.bfloat16)
    x = LLAMA.input()
    unmerged = LLAMA.run(model, x).float()
    lorakit.merge(model)
    assert (LLAMA.run(model, x).float() - unmerged).abs().max() < 0.1  # bf16 outputs, one rounding of W'


@pytest.mark.parametrize("stacked", [False, True], ids=["per-segment", "stacked"])
def test_rows_on_a_dora_adapter_beside_plain_lora_rows_equal_each_alone(stacked):
    model = tiny_llama().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
                   name="dora")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="plain")
    randomize_adapters(model, seed=1)
    for _, layer in lora_layers(model):
        if "dora" in layer.lora:
            layer.lora["dora"].magnitude.data.mul_(1.2)
    ids = torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(2))
    rows = ["dora", "dora", "plain", None]
    with rows_use_adapters(model, rows, stacked=stacked):
        mixed = model(ids).logits
    for row, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = model(ids[row:row + 1]).logits
        else:
            lorakit.set_adapter(model, name)
            alone = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_dora_trains_its_magnitude_with_dropout_on():
    model = LLAMA.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA.targets, use_dora=True, dropout=0.3))
    model.train()
    LLAMA.run(model, LLAMA.input()).pow(2).mean().backward()
    magnitudes = [layer.lora["default"].magnitude for _, layer in lora_layers(model)]
    assert all(m.requires_grad and m.grad is not None and m.grad.abs().max() > 0 for m in magnitudes)


def test_dora_starts_from_the_unchanged_model():
    model = LLAMA.model()
    x = LLAMA.input()
    before = LLAMA.run(model, x)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA.targets, use_dora=True))
    torch.testing.assert_close(LLAMA.run(model, x), before, rtol=1e-5, atol=1e-6)


def test_dora_or_pissa_where_the_family_lacks_it_is_a_clear_error_and_the_model_is_untouched():
    model = EmbeddingModel()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="DoRA is implemented for linear and convolution layers"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["emb"], use_dora=True))
    with pytest.raises(ConfigError, match="factors a weight matrix"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["emb"], init="pissa"))
    assert not list(lora_layers(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_pissa_beside_another_adapter_is_refused():
    model = LLAMA.model()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), name="first")
    with pytest.raises(ConfigError, match="changes the base weight"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], init="pissa"), name="second")


def test_without_autograd_the_factor_is_kept_until_a_b_m_or_w_change(monkeypatch):
    from lorakit.core.layers import dora

    model = dora_model(LLAMA).eval()
    x = LLAMA.input()
    calls = []
    real = dora.dora_factor
    monkeypatch.setattr(dora, "dora_factor", lambda *a: calls.append(1) or real(*a))
    layers = len(list(lora_layers(model)))
    with torch.no_grad():
        first = LLAMA.run(model, x)
        assert len(calls) == layers
        torch.testing.assert_close(LLAMA.run(model, x), first, rtol=0, atol=0)
        assert len(calls) == layers  # kept
        q = model.model.layers[0].self_attn.q_proj.lora["default"]
        q.lora_B.mul_(3)  # an in-place change: its version moves on
        changed = LLAMA.run(model, x)
        assert len(calls) == layers + 1 and (changed - first).abs().max() > 1e-4
    fresh = dora_model(LLAMA).eval()
    with torch.no_grad():
        fresh.model.layers[0].self_attn.q_proj.lora["default"].lora_B.mul_(3)
        torch.testing.assert_close(LLAMA.run(fresh, x), changed, rtol=1e-6, atol=1e-6)
        q.magnitude.data.mul_(2)  # through .data: no version change, so eval() must clear the kept factor
        model.eval()
        assert (LLAMA.run(model, x) - changed).abs().max() > 1e-4
    LLAMA.run(model, x).sum().backward()  # with autograd: computed afresh, and m gets its gradient
    assert q.magnitude.grad is not None
