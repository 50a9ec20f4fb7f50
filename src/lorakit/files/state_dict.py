"""Merging an adapter file into a saved base state dict: the offline export path, with no model
and no lorakit layers (the maths is core.merge's, the same as merging the model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lorakit.core.merge import merge_into_state_dict
from lorakit.errors import AdapterFileError
from lorakit.files.peft_format import PREFIX, read_adapter, split_adapter_key


def merge_adapter_into_state_dict(state_dict: Mapping[str, torch.Tensor], adapter: str | Path,
                                  check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Merge the adapter directory ``adapter`` into ``state_dict`` (keys as in the base model's own
    ``state_dict()``): the weights ``merge_and_unload`` would give. Returns a new dict."""
    files = read_adapter(adapter)
    source = str(adapter)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    transposed: set[str] = set(files.fan_in_fan_out_modules or ())
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in files.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} lacks the {PREFIX!r} prefix of a LoRA adapter file")
        path, part, is_embedding = split_adapter_key(key[len(PREFIX):])
        if part is None:  # a whole tensor saved with the adapter (modules_to_save, a trained bias)
            replacements[key[len(PREFIX):].replace(".base_layer.", ".")] = tensor
            continue
        pairs.setdefault(path, {})[part] = tensor
        if is_embedding:  # (vocab, dim): the transpose of B @ A
            transposed.add(path)
    parts = {"A", "B", "m"} if files.config.use_dora else {"A", "B"}
    for path, pair in pairs.items():
        if set(pair) != parts:
            raise AdapterFileError(f"{source}: {path} has {', '.join(sorted(pair))} of an adapter that needs "
                                   f"{', '.join(sorted(parts))} (m: DoRA's magnitude vector)")
    updates = {path: (pair["A"], pair["B"]) for path, pair in pairs.items()}
    magnitudes = {path: pair["m"] for path, pair in pairs.items() if "m" in pair}
    return merge_into_state_dict(state_dict, files.config, updates, transposed,
                                 files.fan_in_fan_out_modules is not None, replacements, source, check_finite,
                                 magnitudes)
