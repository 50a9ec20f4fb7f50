"""Compression for CPU deployment: chosen Linear layers become truncated-SVD low-rank pairs, and
optionally every Linear runs through PyTorch's dynamic int8 quantization.

A compressed Linear is ``nn.Sequential(Linear(in, r, bias=False), Linear(r, out))``: the model
code is unchanged and its state dict holds ``<path>.0.weight`` (r, in) and ``<path>.1.weight``
(out, r) (and ``<path>.1.bias``). A compressed model directory is a transformers one whose
``lorakit_compression.json`` lists those ranks and whether int8 applies; int8 is not stored but
re-applied on load, since dynamic quantization is a cheap, deterministic function of the weights.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.core.config import ALL_LINEAR, module_matcher
from lorakit.core.svd import (
    low_rank_factors,
    rank_for_energy,
    saves_parameters,
    singular_values,
)
from lorakit.core.walk import replace_module
from lorakit.errors import ConfigError
from lorakit.files.model_directory import WEIGHTS, write_model_directory

COMPRESSION_CONFIG = "lorakit_compression.json"
FORMAT = "lorakit-lowrank"


@dataclass
class Factorised:
    """One Linear layer's outcome: the rank chosen, and whether the factors replaced it."""

    path: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    replaced: bool
    error: float  # ||W - W_r||_F / ||W||_F


def low_rank_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    up, down = low_rank_factors(linear.weight, rank)
    first = nn.Linear(linear.in_features, rank, bias=False, dtype=down.dtype, device=down.device)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, dtype=up.dtype, device=up.device)
    with torch.no_grad():
        first.weight.copy_(down)
        second.weight.copy_(up)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return nn.Sequential(first, second)


def factorise_linears(model: nn.Module, targets: str | tuple[str, ...], rank: int | None = None,
                      energy: float | None = None) -> list[Factorised]:
    """Replace each nn.Linear matching ``targets`` ("all-linear": all but the output head; else
    PEFT's matching rule) by its rank-``rank`` factors, or by the smallest rank keeping ``energy``
    of its squared singular values, in place. A layer whose factors would not be smaller stays dense."""
    if (rank is None) == (energy is None):
        raise ConfigError("give a rank or an energy fraction (not both)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    outcomes = []
    targeted = None if targets == ALL_LINEAR else module_matcher(targets)
    for path, module in list(model.named_modules()):
        wanted = module is not head if targeted is None else targeted(path)
        if type(module) is not nn.Linear or not wanted:
            continue
        values = singular_values(module.weight)
        r = min(rank, len(values)) if rank is not None else rank_for_energy(values, energy)
        error = float((values[r:] ** 2).sum().sqrt() / (values ** 2).sum().sqrt())
        replaced = saves_parameters(module.out_features, module.in_features, r)
        if replaced:
            replace_module(model, path, low_rank_linear(module, r))
        outcomes.append(Factorised(path, (module.out_features, module.in_features), r, replaced, error))
    if not outcomes:
        raise ConfigError(f"targets {targets!r} match no Linear layer of the model")
    return outcomes


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with PyTorch's dynamic int8 quantization of its nn.Linear layers (int8
    weights, activations quantized per batch at run time; CPU only). An output head tied to the
    input embedding stays float: quantizing it would store a second copy of the embedding matrix.
    PyTorch marks torch.ao.quantization deprecated in favour of torchao; it still works, and its
    warnings are not the user's to act on."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    head = model.get_output_embeddings() if tied else None
    layers = {path: default_dynamic_qconfig for path, module in model.named_modules()
              if type(module) is nn.Linear and module is not head}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.cpu(), layers, dtype=torch.qint8)


def serialized_bytes(model: nn.Module) -> int:
    """The size of the model's state dict as torch.save writes it (int8 packed weights included;
    a tied weight counts once)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def save_compressed(model: nn.Module, tokenizer, outcomes: list[Factorised], int8: bool,
                    directory: str | Path) -> Path:
    """Write the low-rank float model and what to re-apply on load (see the module docstring)."""
    description = {"format": FORMAT, "int8": int8, "ranks": {o.path: o.rank for o in outcomes if o.replaced}}
    return write_model_directory(model, tokenizer, directory, COMPRESSION_CONFIG, description)


def is_compressed_directory(path: str | Path) -> bool:
    return (Path(path) / COMPRESSION_CONFIG).is_file()


def load_compressed(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a directory ``save_compressed`` wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    try:
        description = json.loads((directory / COMPRESSION_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{directory / COMPRESSION_CONFIG}: cannot be read ({err})") from None
    if description.get("format") != FORMAT:
        raise ConfigError(f"{directory / COMPRESSION_CONFIG}: format {description.get('format')!r}, "
                          f"expected {FORMAT!r}")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(directory)), dtype=dtype)
    for path, rank in description["ranks"].items():
        linear = model.get_submodule(path)
        replace_module(model, path, nn.Sequential(
            nn.Linear(linear.in_features, rank, bias=False, dtype=dtype),
            nn.Linear(rank, linear.out_features, bias=linear.bias is not None, dtype=dtype)))
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{directory / WEIGHTS}: does not match its config (missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.requires_grad_(False).eval()
    model.name_or_path = description["base_model_name_or_path"] or str(directory)
    if description["int8"]:
        model = quantize_int8(model)
    return model, AutoTokenizer.from_pretrained(str(directory))
