"""Merging adapters into the weights (zero added latency) and taking them out again.

Merge and unmerge are explicit and idempotent, never side effects of ``train()``/``eval()``.
``merge_adapter_into_state_dict`` does the same maths on plain tensors, for deployment code
that has a saved base and an adapter file but no lorakit layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, MergeError
from lorakit.layers.base import delta_in_weight_layout
from lorakit.walk import lora_layers, replace_module, saved_modules


def merge(model: nn.Module, check_finite: bool = True) -> nn.Module:
    """Add every active adapter into its layer's weight; merging again changes nothing.

    With ``check_finite`` every merged weight is computed and checked first, and a NaN or Inf
    anywhere refuses the whole merge, leaving the model untouched.
    """
    layers = list(lora_layers(model))
    if check_finite:
        for path, layer in layers:
            if not layer.merged_weight_is_finite():
                raise MergeError(
                    f"merging into {path} would give NaN/Inf weights (the adapter or the base weight is not "
                    "finite, or the sum overflows the weight dtype); nothing was merged"
                )
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, check_finite: bool = True) -> nn.Module:
    """Merge the active adapters, then replace every lorakit module by the plain module it wraps
    (active saved-module copies replace their originals). The result holds no lorakit class."""
    merge(model, check_finite)
    return _unwrap(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging them: the base model as it was before injection."""
    unmerge(model)
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = None
    return _unwrap(model)


def _unwrap(model: nn.Module) -> nn.Module:
    for path, layer in list(lora_layers(model)):
        replace_module(model, path, layer.plain_module())
    for path, wrapper in list(saved_modules(model)):
        replace_module(model, path, wrapper.current())
    return model


def merge_adapter_into_state_dict(
    state_dict: Mapping[str, torch.Tensor], adapter: str | Path, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Merge the adapter directory ``adapter`` into a saved base ``state_dict`` (keys as in the
    base model's own ``state_dict()``). Returns a new dict; the input is not modified.

    The weights come out as the model merge (``merge_and_unload``) writes them: each layer's update
    laid out by the same rule (``delta_in_weight_layout``), added in float32 and rounded once. A
    layer stored transposed (GPT-2's Conv1D) is known by name from lorakit's files; PEFT's files say
    only fan_in_fan_out for the whole adapter, so then a layer's shape decides, and a square one
    (where both layouts fit) is an error rather than a guess.

    A QA-LoRA adapter merges into a quantized state dict (lorakit's quantized model file): its
    (out, in / g) update shifts ``<path>.mins``; codes and scales are left as they are.
    Needs no model and no lorakit layers: this is the offline export path.
    """
    from lorakit.io.peft_format import PREFIX, read_adapter, split_adapter_key

    files = read_adapter(adapter)
    config = files.config
    merged = dict(state_dict)
    source = str(adapter)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    for key, tensor in files.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} lacks the {PREFIX!r} prefix of a LoRA adapter file")
        path, part, is_embedding = split_adapter_key(key[len(PREFIX):])
        if part is None:
            # A full tensor saved with the adapter (modules_to_save, a trained bias): it replaces the base's.
            base_key = key[len(PREFIX):].replace(".base_layer.", ".")
            _check_base_key(merged, base_key, tensor.shape, source)
            merged[base_key] = tensor.to(merged[base_key].dtype)
        else:
            pairs.setdefault(path, {})[part] = tensor
            if is_embedding:
                embeddings.add(path)
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFileError(f"{source}: {path} has lora_{next(iter(pair))} without its partner")
        base_key = f"{path}.mins" if config.qalora_group_size else f"{path}.weight"
        base = merged.get(base_key)
        if base is None:
            kind = "a quantized state dict (QA-LoRA adapter)" if config.qalora_group_size else "the state dict"
            raise AdapterFileError(f"{source}: adapts {path}, but {kind} has no {base_key!r}")
        a, b = pair["A"], pair["B"]
        r = config.rank_for(path)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(f"{source}: {path} has rank {a.shape[0]} in the file but r={r} in its config")
        transposed = path in embeddings or _stored_transposed(path, a, b, base.shape, files, source)
        # QA-LoRA: (out, in / g), one value per group of the mins.
        delta = delta_in_weight_layout(a, b, config.scaling_for(path), transposed)
        if tuple(delta.shape) != tuple(base.shape):
            raise AdapterFileError(f"{source}: the update for {path} has shape {tuple(delta.shape)}, "
                                   f"the base weight {tuple(base.shape)}")
        new = (base.to(delta.dtype) + delta).to(base.dtype)
        if check_finite and not torch.isfinite(new).all():
            raise MergeError(f"merging into {base_key} gives NaN/Inf weights; nothing was returned")
        merged[base_key] = new
    return merged


def _stored_transposed(path: str, a: torch.Tensor, b: torch.Tensor, base_shape: torch.Size, files,
                       source: str) -> bool:
    """Whether ``path``'s weight is stored (in, out), the transpose of B @ A (GPT-2's Conv1D)."""
    if files.fan_in_fan_out_modules is not None:  # lorakit's file names them
        return path in files.fan_in_fan_out_modules
    if not files.config.fan_in_fan_out or a.dim() > 2:
        return False
    out_in, in_out = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    if out_in == in_out:
        raise AdapterFileError(
            f"{source}: says fan_in_fan_out for the whole adapter (as PEFT writes it), and {path} is square, so its "
            "state dict cannot tell whether it is stored transposed (a GPT-2 Conv1D) or not (a Linear); merge on "
            "the model instead (lorakit.merge_and_unload, or lorakit merge)")
    return tuple(base_shape) == in_out


def _check_base_key(state_dict: Mapping[str, torch.Tensor], key: str, shape: torch.Size, source: str) -> None:
    if key not in state_dict:
        raise AdapterFileError(f"{source}: holds {key!r}, which the base state dict does not have")
    if tuple(state_dict[key].shape) != tuple(shape):
        raise AdapterFileError(f"{source}: {key!r} has shape {tuple(shape)}, the base {tuple(state_dict[key].shape)}")
