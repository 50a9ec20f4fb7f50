"""DoRA and PiSSA/OLoRA against Hugging Face PEFT on the same weights, files read both ways."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorakit
from lorakit.core.walk import lora_layers
from lorakit.files.peft_format import adapter_slots
from tests.conftest import (
    MLP,
    Case,
    random_tokens,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
)
from tests.test_peft_parity import PARITY_CASES, PlainCNN

DORA_CASES = [
    Case("linear", MLP, PARITY_CASES[0].make_input, ["fc1", "fc2", "head"]),
    Case("gpt2_conv1d", tiny_gpt2, random_tokens, ["c_attn", "c_proj", "c_fc"]),
    Case("conv", PlainCNN, PARITY_CASES[2].make_input, ["conv1", "conv2", "seq_conv"]),
    Case("llama", tiny_llama, random_tokens, ["q_proj", "v_proj", "down_proj"]),
]


def randomize_dora(model, seed=0):
    """Random A and B, and magnitudes moved off ||W|| so that m matters too."""
    randomize_adapters(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.lora.values():
                adapter.magnitude.mul_(1 + 0.2 * torch.rand(adapter.magnitude.shape, generator=g))


def _file_key(name: str) -> str:
    """PEFT's parameter name -> its file key (no adapter name; the magnitude has no ".weight")."""
    key = name.replace(".default", "")
    return key[: -len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key


@pytest.mark.parametrize("case", DORA_CASES, ids=[c.name for c in DORA_CASES])
def test_lorakit_dora_adapter_runs_in_peft_with_the_same_outputs_and_gradients(case, tmp_path):
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=case.targets, use_dora=True))
    randomize_dora(model)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=True)
    assert peft_model.peft_config["default"].use_dora

    x = case.input()
    ours, theirs = case.run(model, x), case.run(peft_model, x)
    with lorakit.disable_adapters(model):
        assert (case.run(model, x) - ours).abs().max() > 1e-3  # the adapter (and m) change the output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    our_grads = {k: p.grad for k, p in adapter_slots(model, "default").items()}
    their_grads = {_file_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    assert any(k.endswith("lora_magnitude_vector") for k in our_grads)
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", DORA_CASES, ids=[c.name for c in DORA_CASES])
def test_peft_dora_adapter_loads_in_lorakit_and_both_merge_to_the_same_weights(case, tmp_path):
    torch.manual_seed(3)
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=case.targets, use_dora=True, init_lora_weights=False)
    peft_model = get_peft_model(case.model(), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.1)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(case.model(), tmp_path)
    x = case.input()
    torch.testing.assert_close(case.run(model, x), case.run(peft_model, x), rtol=1e-5, atol=1e-5)

    theirs = peft_model.merge_and_unload().state_dict()
    ours = lorakit.merge_and_unload(model).state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_lorakit_svd_init_starts_unchanged_and_saves_a_plain_adapter_for_the_untouched_base(init, tmp_path):
    case = DORA_CASES[3]
    torch.manual_seed(0)
    original = case.model()
    x = case.input()
    before = case.run(original, x)
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=case.targets, init=init))
    torch.testing.assert_close(case.run(model, x), before, rtol=1e-4, atol=1e-5)  # residual + s B A = W
    q = model.model.layers[0].self_attn.q_proj
    assert (q.weight - original.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3  # the base changed
    randomize_adapters(model, seed=5)  # as if trained
    trained = case.run(model, x)
    lorakit.save_adapter(model, tmp_path)

    saved = lorakit.read_adapter_config(tmp_path)
    assert (saved.r, saved.alpha, saved.init) == (8, 16, "default")
    on_original = lorakit.load_adapter(case.model(), tmp_path)
    torch.testing.assert_close(case.run(on_original, x), trained, rtol=1e-4, atol=1e-5)
    in_peft = PeftModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(case.run(in_peft, x), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*changes the base weights:UserWarning")  # PEFT's, loading its initial adapter
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_svd_init_adapter_loads_in_lorakit_on_the_original_base(init, tmp_path):
    """PEFT's own PiSSA/OLoRA inits equal lorakit's, and PEFT's converted files load in lorakit."""
    case = DORA_CASES[3]
    torch.manual_seed(0)
    peft_model = get_peft_model(case.model(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=case.targets,
                                                              init_lora_weights=init))
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=case.targets, init=init))
    theirs = {_file_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    for key, param in adapter_slots(model, "default").items():
        torch.testing.assert_close(param, theirs[key], rtol=1e-4, atol=1e-5, msg=key)  # same factors

    # PEFT's documented recipe: keep the initial adapter, marked as one that needs no init, to convert against.
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    randomize_adapters(model, seed=5)
    with torch.no_grad():
        for key, param in adapter_slots(model, "default").items():
            theirs[key].copy_(param)
    x = case.input()
    trained = case.run(peft_model, x)
    torch.testing.assert_close(case.run(model, x), trained, rtol=1e-4, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    loaded = lorakit.load_adapter(case.model(), tmp_path / "converted")
    torch.testing.assert_close(case.run(loaded, x), trained, rtol=1e-4, atol=1e-5)
