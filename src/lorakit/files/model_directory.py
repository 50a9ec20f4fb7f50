"""A transformers-style model directory whose weights only lorakit can load (quantized or low-rank
layers): config.json, the tokenizer, model.safetensors, and a JSON description saying what to build."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lorakit.files.atomic import atomic_directory

WEIGHTS = "model.safetensors"


def write_model_directory(model: nn.Module, tokenizer, directory: str | Path, description_file: str,
                          description: dict) -> Path:
    """Write ``model`` and ``description`` (plus the model's base name) atomically. A tied weight
    (lm_head = embed_tokens) is stored once; the loader's tie_weights() restores it."""
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().cpu().contiguous()
    description = description | {"base_model_name_or_path": str(getattr(model, "name_or_path", "") or "")}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / description_file).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return directory
