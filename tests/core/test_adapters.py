import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import ModulesToSave
from lorakit.core.walk import lora_layers
from tests.conftest import MLP, randomize_adapters, tiny_llama

X = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))


def two_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["fc1", "fc2"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["fc2", "head"]), name="b")
    randomize_adapters(model)
    return model


def test_adding_a_second_adapter_activates_it_alone():
    model = two_adapters()
    assert lorakit.adapter_names(model) == ["a", "b"]
    assert lorakit.active_adapters(model) == ("b",)
    assert model.fc1.active_adapters == () and model.fc2.active_adapters == ("b",)


def test_switching_adapters_switches_outputs_and_trainable_flags():
    model = two_adapters()
    out_b = model(X)
    lorakit.set_adapter(model, "a")
    out_a = model(X)
    assert not torch.allclose(out_a, out_b)
    assert model.fc1.lora["a"].lora_A.requires_grad and not model.fc2.lora["b"].lora_A.requires_grad
    lorakit.set_adapter(model, "b")
    assert torch.equal(model(X), out_b)


def test_several_active_adapters_add_up():
    model = two_adapters()
    with lorakit.disable_adapters(model):
        base = model.fc2(torch.randn(3, 24, generator=torch.Generator().manual_seed(1)))
    h = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    lorakit.set_adapter(model, "a")
    delta_a = model.fc2(h) - base
    lorakit.set_adapter(model, "b")
    delta_b = model.fc2(h) - base
    lorakit.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(model.fc2(h), base + delta_a + delta_b)


def test_disable_adapters_gives_the_base_model_even_when_merged():
    torch.manual_seed(0)
    model = MLP()
    base_out = model(X)
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    randomize_adapters(model)
    adapted = model(X)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(X), base_out)
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(X), base_out, rtol=1e-5, atol=1e-6)
    assert model.fc1.merged_adapters == ["default"]
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)


def test_delete_adapter_and_the_last_one_restores_plain_modules():
    model = two_adapters()
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"]
    assert type(model.head) is nn.Linear
    lorakit.delete_adapter(model, "a")
    assert not list(lora_layers(model)) and type(model.fc1) is nn.Linear
    with pytest.raises(lorakit.ConfigError, match="no adapter named 'a'"):
        lorakit.delete_adapter(model, "a")


def test_unknown_adapter_and_switch_while_merged_are_errors():
    model = two_adapters()
    with pytest.raises(lorakit.ConfigError, match="the model has adapters 'a', 'b'"):
        lorakit.set_adapter(model, "c")
    lorakit.merge(model)
    with pytest.raises(lorakit.MergeError, match="unmerge"):
        lorakit.set_adapter(model, "a")


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"fc1.bias", "fc2.bias"}),
    ("all", {"fc1.bias", "fc2.bias", "head.bias"}),
])
def test_bias_modes_follow_loralib(bias, expected):
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["fc1", "fc2"]))
    lorakit.mark_only_lora_as_trainable(model, bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n}
    assert trainable == expected
    assert lorakit.get_adapter_config(model, "default").bias == bias  # so save_adapter saves them


def test_lora_state_dict_round_trips_through_load_state_dict():
    model = two_adapters()
    state = lorakit.lora_state_dict(model)
    assert set(state) == {"fc2.lora.b.lora_A", "fc2.lora.b.lora_B", "head.lora.b.lora_A", "head.lora.b.lora_B"}
    fresh = two_adapters()
    with torch.no_grad():
        for p in lorakit.lora_parameters(fresh):
            p.zero_()
    fresh.load_state_dict(state, strict=False)
    torch.testing.assert_close(fresh(X), model(X))


def test_modules_to_save_trains_a_copy_per_adapter_and_keeps_the_original():
    model = tiny_llama()
    original = model.lm_head.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    copy_weight = model.lm_head.modules_to_save["default"].weight
    assert copy_weight.requires_grad and not model.lm_head.original_module.weight.requires_grad
    with torch.no_grad():
        copy_weight.add_(1.0)
    ids = torch.randint(3, 96, (1, 5))
    adapted = model(ids).logits
    with lorakit.disable_adapters(model):
        base = model(ids).logits
    assert not torch.allclose(adapted, base)
    assert torch.equal(model.lm_head.original_module.weight, original)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.lm_head) is nn.Linear
    torch.testing.assert_close(plain(ids).logits, adapted)


def test_modules_to_save_overlapping_a_target_is_an_error():
    with pytest.raises(lorakit.TargetError, match="both adapted by LoRA and in modules_to_save"):
        lorakit.inject(MLP(), lorakit.LoraConfig(target_modules=["head"], modules_to_save=["head"]))
