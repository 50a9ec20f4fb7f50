"""lorakit's own adapter files: layout, round trip, and every kind of bad file."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.walk import lora_layers
from tests.conftest import (
    MLP,
    as_peft_writes_it,
    injected,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
)


def saved_llama(tmp_path: Path, **config) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, **config))
    randomize_adapters(model)
    return model, lorakit.save_adapter(model, tmp_path / "adapter")


def test_round_trip_gives_identical_outputs(case, tmp_path):
    model = injected(case)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(case.model(), tmp_path)
    x = case.input()
    assert torch.equal(case.run(loaded, x), case.run(model, x))


def test_file_layout_is_peft_s(tmp_path):
    _model, directory = saved_llama(tmp_path, target_modules=["q_proj", "embed_tokens"])
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert metadata.pop("format") == "pt"  # all PEFT reads
        assert set(metadata) == {"lorakit.config_digest", "lorakit.fan_in_fan_out_modules"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    p = "base_model.model.model."
    assert shapes[p + "layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes[p + "layers.0.self_attn.q_proj.lora_B.weight"] == (32, 4)
    assert shapes[p + "embed_tokens.lora_embedding_A"] == (4, 96)
    assert shapes[p + "embed_tokens.lora_embedding_B"] == (32, 4)
    assert len(shapes) == 2 * 2 + 2
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "embed_tokens"]
    assert list(config) == sorted(config)


def test_all_linear_is_written_as_the_exact_module_names(tmp_path):
    model, directory = saved_llama(tmp_path, target_modules="all-linear")
    targets = json.loads((directory / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(dict(lora_layers(model)))


def test_short_names_that_would_also_match_by_suffix_become_an_exact_regex(tmp_path):
    def model_with_two_fc(top: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("fc", top)
        model.add_module("block", torch.nn.Sequential())
        model.block.add_module("fc", torch.nn.Linear(4, 4))
        return model

    model = model_with_two_fc(lorakit.Linear(4, 4, r=2))  # built by hand: the config names no targets
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    targets = lorakit.read_adapter_config(tmp_path).target_modules
    assert targets == "(?:fc)"  # the list ["fc"] would also select block.fc
    loaded = lorakit.load_adapter(model_with_two_fc(torch.nn.Linear(4, 4)), tmp_path)
    assert set(dict(lora_layers(loaded))) == {"fc"}


def test_biases_and_saved_modules_are_written_under_peft_keys(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["fc1"], bias="lora_only", modules_to_save=["head"]))
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    assert keys == {p + "fc1.lora_A.weight", p + "fc1.lora_B.weight", p + "fc1.base_layer.bias",
                    p + "head.weight", p + "head.bias"}
    torch.manual_seed(0)
    loaded = lorakit.load_adapter(MLP(), tmp_path)
    x = torch.randn(2, 12)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_second_named_adapter_loads_beside_the_first(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["fc1"]), name="a")
    randomize_adapters(model, seed=1)
    lorakit.save_adapter(model, tmp_path / "a")
    x = torch.randn(2, 12)
    out_a = model(x)
    other = MLP()
    lorakit.inject(other, lorakit.LoraConfig(target_modules=["fc2"]), name="b")
    randomize_adapters(other, seed=2)
    other.load_state_dict(model.state_dict(), strict=False)
    lorakit.save_adapter(other, tmp_path / "b")

    lorakit.load_adapter(model, tmp_path / "b", name="b")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapters(model) == ("b",)
    torch.testing.assert_close(model(x), other(x))
    lorakit.set_adapter(model, "a")
    torch.testing.assert_close(model(x), out_a)


def test_saving_which_adapter_must_be_said_when_ambiguous(tmp_path):
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["fc1"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["fc2"]), name="b")
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.raises(lorakit.ConfigError, match="pass name="):
        lorakit.save_adapter(model, tmp_path)
    lorakit.save_adapter(model, tmp_path, name="a")
    assert lorakit.read_adapter_config(tmp_path).target_modules == ("fc1",)


def test_an_interrupted_save_leaves_the_old_files(tmp_path, monkeypatch):
    model, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    before = (directory / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.files.peft_format.save_file", crash)
    randomize_adapters(model, seed=5)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]


# --- bad files: each a clear error, and the model left untouched ------------------------------


def assert_load_fails_cleanly(directory: Path, match: str) -> None:
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(lorakit.AdapterFileError, match=match):
        lorakit.load_adapter(model, directory)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_is_an_error(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_tensors(directory, lambda t: t.__setitem__(key, torch.zeros(4, 31)))
    assert_load_fails_cleanly(directory, r"q_proj.lora_A.weight has shape \(4, 31\), but this model needs \(4, 32\)")


def test_rank_that_disagrees_with_the_config_is_an_error(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    as_peft_writes_it(directory)  # no record of the settings the weights were saved with
    config = json.loads((directory / "adapter_config.json").read_text())
    config["r"] = 8
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert_load_fails_cleanly(directory, "has rank 4, but adapter_config.json gives r=8")


def test_weights_and_a_config_of_different_saves_are_refused(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 2 * config["lora_alpha"]}))
    assert_load_fails_cleanly(directory, "saved with other settings than adapter_config.json gives")
    # Keys that do not change the computation may be edited by hand.
    (directory / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "me/mine"}))
    assert lorakit.read_adapter_config(directory).base_model_name_or_path == "me/mine"


def test_unknown_key_is_an_error(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    rewrite_tensors(directory, lambda t: t.__setitem__("base_model.model.model.nope.lora_A.weight", torch.zeros(4, 32)))
    assert_load_fails_cleanly(directory, r"1 tensor\(s\) match no module of this model, e.g. 'base_model.model.model.nope")


def test_missing_key_is_an_error(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    rewrite_tensors(directory, lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    assert_load_fails_cleanly(directory, "are missing, e.g. 'base_model.model.model.layers.1.self_attn.q_proj.lora_B")


def test_truncated_safetensors_is_an_error(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_load_fails_cleanly(directory, "not a readable safetensors file .* truncated or corrupt")


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    (directory / "adapter_model.safetensors").unlink()
    # A pickle that would run code if it were ever unpickled.
    (directory / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    assert_load_fails_cleanly(directory, "adapter_model.bin, a pickle, which lorakit never loads")
    assert not Path("pwned").exists()


def test_bad_json_and_missing_files_are_errors(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q_proj"])
    (directory / "adapter_config.json").write_text("{not json")
    assert_load_fails_cleanly(directory, "adapter_config.json: not valid JSON")
    assert_load_fails_cleanly(tmp_path / "nowhere", "no such adapter directory")
    (tmp_path / "empty").mkdir()
    assert_load_fails_cleanly(tmp_path / "empty", "no adapter_config.json")


def test_adapter_for_another_base_model_is_an_error(tmp_path):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["c_attn"]))
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(lorakit.TargetError, match="matches no module of LlamaForCausalLM"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
