"""Merging adapters into the weights (zero added latency) and taking them out again.

Merge and unmerge are explicit and idempotent, never side effects of ``train()``/``eval()``.
``merge_into_state_dict`` does the same maths on plain tensors, for deployment code that has a
saved base and an adapter file but no lorakit layers (``lorakit.merge_adapter_into_state_dict``
reads the file and calls it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.adapter import delta_in_weight_layout
from lorakit.core.layers.dora import dora_weight_change, magnitude_shape
from lorakit.core.walk import lora_layers, replace_module, saved_modules
from lorakit.errors import AdapterFileError, MergeError


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


def merge_into_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: LoraConfig, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    transposed: set[str], named_layout: bool, replacements: Mapping[str, torch.Tensor], source: str,
    check_finite: bool = True, magnitudes: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge an adapter's updates into a saved base ``state_dict`` (keys as in the base model's own
    ``state_dict()``). Returns a new dict; the input is not modified.

    ``updates``: module path -> (A, B). ``transposed``: the paths whose weight is stored (in, out),
    the transpose of B @ A (embeddings, GPT-2's Conv1D); with ``named_layout`` False the file did not
    name its Conv1D layers (PEFT's one fan_in_fan_out flag), and under that flag a layer's shape
    decides, a square one being an error rather than a guess. ``replacements``: whole tensors saved
    with the adapter (modules_to_save, trained biases), by base key. ``magnitudes``: module path ->
    DoRA's m, for a DoRA adapter.

    The weights come out as the model merge (``merge_and_unload``) writes them: each layer's update
    laid out by the same rule (``delta_in_weight_layout``), added in float32 and rounded once. A
    QA-LoRA adapter merges into a quantized state dict (lorakit's quantized model file): its
    (out, in / g) update shifts ``<path>.mins``; codes and scales are left as they are.
    """
    merged = dict(state_dict)
    magnitudes = magnitudes or {}
    if magnitudes and config.qalora_group_size:
        raise AdapterFileError(f"{source}: a DoRA adapter on a quantized base; lorakit merges DoRA into float weights")
    for base_key, tensor in replacements.items():
        _check_base_key(merged, base_key, tensor.shape, source)
        merged[base_key] = tensor.to(merged[base_key].dtype)
    for path, (a, b) in updates.items():
        base_key = f"{path}.mins" if config.qalora_group_size else f"{path}.weight"
        base = merged.get(base_key)
        if base is None:
            kind = "a quantized state dict (QA-LoRA adapter)" if config.qalora_group_size else "the state dict"
            raise AdapterFileError(f"{source}: adapts {path}, but {kind} has no {base_key!r}")
        r = config.rank_for(path)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(f"{source}: {path} has rank {a.shape[0]} in the file but r={r} in its config")
        is_transposed = path in transposed or (not named_layout and _stored_transposed(path, a, b, base.shape,
                                                                                        config, source))
        # QA-LoRA: (out, in / g), one value per group of the mins.
        delta = delta_in_weight_layout(a, b, config.scaling_for(path), is_transposed)
        if tuple(delta.shape) != tuple(base.shape):
            raise AdapterFileError(f"{source}: the update for {path} has shape {tuple(delta.shape)}, "
                                   f"the base weight {tuple(base.shape)}")
        if path in magnitudes:
            magnitude = magnitudes[path]
            if tuple(magnitude.shape) != magnitude_shape(base, is_transposed):
                raise AdapterFileError(f"{source}: DoRA's magnitude for {path} has shape {tuple(magnitude.shape)}, "
                                       f"the base weight {tuple(base.shape)} needs {magnitude_shape(base, is_transposed)}")
            delta = dora_weight_change(base, delta, magnitude, is_transposed)
        new = (base.to(delta.dtype) + delta).to(base.dtype)
        if check_finite and not torch.isfinite(new).all():
            raise MergeError(f"merging into {base_key} gives NaN/Inf weights; nothing was returned")
        merged[base_key] = new
    return merged


def _stored_transposed(path: str, a: torch.Tensor, b: torch.Tensor, base_shape: torch.Size, config: LoraConfig,
                       source: str) -> bool:
    """Whether ``path``'s weight is stored (in, out), when the file says only fan_in_fan_out."""
    if not config.fan_in_fan_out or a.dim() > 2:
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
