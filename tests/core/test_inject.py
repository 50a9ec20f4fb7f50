import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.walk import lora_layers
from tests.conftest import MLP, tiny_gpt2, tiny_llama


def test_output_is_identical_to_the_base_right_after_injection(case):
    model = case.model()
    x = case.input()
    before = case.run(model, x)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=case.targets))
    assert torch.equal(case.run(model, x), before)


def test_an_optimizer_step_changes_adapters_and_never_the_base(case):
    model = case.model().train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, dropout=0.1, target_modules=case.targets))
    lorakit.mark_only_lora_as_trainable(model, bias="none")
    params = list(lorakit.lora_parameters(model))
    adapters_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        case.run(model, case.input()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    assert any(not torch.equal(p, q) for p, q in zip(params, adapters_before, strict=True))


def test_trainable_parameters_are_exactly_the_adapters(case):
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=case.targets))
    expected = 0
    for _, layer in lora_layers(model):
        a_shape, b_shape = type(layer).adapter_shapes(layer, 4)
        expected += torch.Size(a_shape).numel() + torch.Size(b_shape).numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == sum(p.numel() for p in lorakit.lora_parameters(model))


def test_llama_trainable_count_matches_the_formula():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    h, i, kv = 32, 48, 16  # hidden, intermediate, k/v width (2 kv heads of 8)
    per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer


def test_all_linear_leaves_out_the_output_head_and_finds_gpt2_conv1d():
    llama = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in dict(lora_layers(llama))
    assert len(dict(lora_layers(llama))) == 2 * 7
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(target_modules="all-linear"))
    paths = dict(lora_layers(gpt2))
    assert "transformer.h.0.attn.c_attn" in paths and "lm_head" not in paths
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, LoraLayer)


def test_suffix_list_regex_and_exclusion():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert set(dict(lora_layers(model))) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert set(dict(lora_layers(model))) == {"model.layers.1.self_attn.q_proj"}


def test_base_parameter_names_do_not_change():
    model = tiny_llama()
    names = set(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear"))
    assert names <= set(model.state_dict())


def test_tied_weights_stay_tied():
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["wte", "c_attn"]))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_pattern_that_matches_nothing_is_an_error_naming_real_modules():
    with pytest.raises(lorakit.TargetError, match=r"matches no module of MLP; adaptable modules here include: fc1"):
        lorakit.inject(MLP(), lorakit.LoraConfig(target_modules=["q_proj"]))


def test_a_pattern_matching_an_unsupported_module_is_an_error():
    model = tiny_llama()
    with pytest.raises(lorakit.TargetError, match=r"matches model.layers.0.mlp \(LlamaMLP\)"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["mlp"]))


def test_subclasses_with_their_own_forward_are_not_adapted_as_their_parent():
    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = nn.Sequential(ScaledEmbedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(lorakit.TargetError, match="ScaledEmbedding"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["0"]))


def test_failed_injection_leaves_the_model_untouched():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lorakit.TargetError):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "mlp"]))
    assert not list(lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()


def test_rank_pattern_sets_per_module_rank():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].lora["default"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].lora["default"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].lora["default"].scaling == 16 / 2


def test_adapter_names_with_a_dot_are_refused():
    with pytest.raises(lorakit.ConfigError, match="without '.'"):
        lorakit.inject(MLP(), lorakit.LoraConfig(), name="a.b")
