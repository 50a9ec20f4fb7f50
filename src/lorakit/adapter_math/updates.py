"""An adapter file as its layers' updates: (A, B, s) per adapted module, and back to a file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.core.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.files.peft_config import to_peft_dict
from lorakit.files.peft_format import (
    PREFIX,
    TRANSPOSED_MODULES,
    AdapterFiles,
    magnitude_key,
    matrix_keys,
    split_adapter_key,
    write_adapter_files,
)


@dataclass
class LayerUpdate:
    """One adapted module's update s * B @ A: A (r, in...) and B (out, r...) as in the file."""

    path: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    embedding: bool  # keys lora_embedding_A/B instead of lora_A/B.weight
    magnitude: torch.Tensor | None = None  # DoRA's m

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> torch.Tensor:
        """s * B @ A as (out, in * k...) in float64, the orientation of B @ A whatever the weight's layout."""
        return self.scaling * self.lora_B.double().flatten(1) @ self.lora_A.double().flatten(1)


def layer_updates(files: AdapterFiles, source: str) -> list[LayerUpdate]:
    """Every adapted module's update, by module path; AdapterFileError for tensors that are not
    LoRA matrices (saved whole modules or biases: such adapters change more than a low-rank update)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    for key, tensor in files.tensors.items():
        path, part, is_embedding = split_adapter_key(key.removeprefix(PREFIX))
        if part is None:
            raise AdapterFileError(f"{source}: holds {key!r}, a whole tensor (modules_to_save or a bias), not a LoRA "
                                   "matrix; this takes adapters of LoRA matrices only")
        parts.setdefault(path, {})[part] = tensor
        if is_embedding:
            embedding.add(path)
    updates = []
    for path, found in sorted(parts.items(), key=lambda item: _natural(item[0])):
        if "A" not in found or "B" not in found:
            raise AdapterFileError(f"{source}: {path} has lora_{''.join(found)} without its partner")
        updates.append(LayerUpdate(path, found["A"], found["B"], files.config.scaling_for(path), path in embedding,
                                   found.get("m")))
    if not updates:
        raise AdapterFileError(f"{source}: holds no LoRA matrices")
    return updates


def _natural(path: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


def write_updates(directory: str | Path, config: LoraConfig, updates: list[LayerUpdate],
                  transposed: frozenset[str] | None) -> Path:
    """An adapter directory holding ``updates`` under ``config`` (whose rank and scaling they must fit),
    targeting exactly their modules. ``transposed``: the source's GPT-2 Conv1D modules, if it named them."""
    tensors: dict[str, torch.Tensor] = {}
    for update in updates:
        a_key, b_key = matrix_keys(update.path, update.embedding)
        tensors[a_key], tensors[b_key] = update.lora_A.float().contiguous(), update.lora_B.float().contiguous()
        if update.magnitude is not None:
            tensors[magnitude_key(update.path)] = update.magnitude.float()
    file_config = to_peft_dict(config, [update.path for update in updates])
    metadata = {TRANSPOSED_MODULES: json.dumps(sorted(transposed))} if transposed is not None else {}
    return write_adapter_files(directory, file_config, tensors, metadata)
