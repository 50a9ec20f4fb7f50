"""The adapter registry: loads on demand, evicts least recently used within a byte budget, and
refuses adapters that are unsafe or do not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit.serve.registry import AdapterRegistry
from tests.conftest import as_peft_writes_it
from tests.serve.conftest import _save_adapter


@pytest.fixture
def adapters(tiny_base_dir, tmp_path):
    for seed, name in enumerate(["a", "b", "c"]):
        _save_adapter(tiny_base_dir, tmp_path / name, 4, seed)
    return tmp_path


def _registry(tiny_base_dir, **kwargs):
    return AdapterRegistry(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), **kwargs)


def test_least_recently_used_adapters_make_room_and_come_back_on_demand(tiny_base_dir, adapters):
    registry = _registry(tiny_base_dir, budget_bytes=1 << 30)
    size = registry.register("a", adapters / "a").bytes
    registry.budget_bytes = 2 * size  # room for two
    registry.register("b", adapters / "b")
    registry.acquire("a")  # a is in use and now the most recent
    registry.register("c", adapters / "c")  # evicts b, the least recently used not in use
    assert [registry.info(n).loaded for n in "abc"] == [True, False, True]
    assert set(lorakit.adapter_names(registry.model)) == {"a", "c"}
    registry.release("a")
    registry.acquire("b")  # loaded again from its directory, evicting a
    assert [registry.info(n).loaded for n in "abc"] == [False, True, True]
    assert registry.loaded_bytes <= registry.budget_bytes


def test_an_adapter_in_use_is_neither_evicted_nor_unloaded(tiny_base_dir, adapters):
    registry = _registry(tiny_base_dir)
    size = registry.register("a", adapters / "a").bytes
    registry.budget_bytes = size
    registry.acquire("a")
    with pytest.raises(lorakit.ConfigError, match="no room"):
        registry.register("b", adapters / "b")
    with pytest.raises(lorakit.ConfigError, match="in use"):
        registry.unregister("a")
    registry.release("a")
    registry.unregister("a")
    assert "a" not in registry and lorakit.adapter_names(registry.model) == []


def _edit(directory, config=None, tensors=None):
    """Change an adapter's files as a foreign writer would (PEFT's metadata: nothing binds the two)."""
    as_peft_writes_it(directory)
    if config:
        data = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps(data | config))
    if tensors:
        path = directory / "adapter_model.safetensors"
        save_file(tensors(load_file(str(path))), str(path), metadata={"format": "pt"})


def _poison(tensors):
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return tensors


@pytest.mark.parametrize(("edit", "words"), [
    ({"config": {"base_model_name_or_path": "someone/else"}}, "trained on someone/else"),
    ({"config": {"modules_to_save": ["lm_head"]}}, "whole modules"),
    ({"config": {"r": 4}, "tensors": lambda t: t | {"extra.weight": torch.zeros(2)}}, "not a LoRA matrix"),
    ({"tensors": _poison}, "NaN"),
])
def test_unsafe_or_foreign_adapters_are_refused(tiny_base_dir, adapters, edit, words):
    _edit(adapters / "a", **edit)
    registry = _registry(tiny_base_dir)
    with pytest.raises(lorakit.AdapterFileError, match=words):
        registry.register("a", adapters / "a")
    assert lorakit.adapter_names(registry.model) == [] and "a" not in registry  # nothing is left behind


def test_a_rank_above_the_cap_and_a_bad_name_are_refused(tiny_base_dir, adapters):
    registry = _registry(tiny_base_dir, max_rank=2)
    with pytest.raises(lorakit.AdapterFileError, match="rank 4"):
        registry.register("a", adapters / "a")
    with pytest.raises(lorakit.ConfigError, match="adapter name"):
        registry.register("../a", adapters / "a")
