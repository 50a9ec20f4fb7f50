"""Several named adapters on one model: list, select, disable, delete; which parameters train.

The loralib helpers live here too: ``mark_only_lora_as_trainable``, ``lora_parameters`` and
``lora_state_dict`` keep loralib's names and ``bias`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.core.config import BIAS_MODES, LoraConfig
from lorakit.core.walk import Inventory, bias_parameters, inventory, replace_module
from lorakit.errors import ConfigError, MergeError


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model, in the order first met."""
    return _names(inventory(model))


def _names(found: Inventory) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in found.layers:
        names.update(dict.fromkeys(layer.lora))
    for _, wrapper in found.wrappers:
        names.update(dict.fromkeys(wrapper.modules_to_save))
    return list(names)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters that currently add to the model's output."""
    return _active(inventory(model))


def _active(found: Inventory) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for _, layer in found.layers:
        names.update(dict.fromkeys(layer.active_adapters))
    for _, wrapper in found.wrappers:
        if wrapper.active_adapter is not None:
            names[wrapper.active_adapter] = None
    return tuple(names)


def get_adapter_config(model: nn.Module, name: str, found: Inventory | None = None) -> LoraConfig:
    """The LoraConfig adapter ``name`` was created from (``found``: the model's inventory, if the
    caller walked it already)."""
    return _config(inventory(model) if found is None else found, name)


def _config(found: Inventory, name: str) -> LoraConfig:
    for _, layer in found.layers:
        if name in layer.lora:
            return layer.lora[name].config
    raise ConfigError(f"no adapter named {name!r}; the model has {_describe(_names(found))}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up) and the trainable ones."""
    names = (names,) if isinstance(names, str) else tuple(names)
    found = inventory(model)
    known = _names(found)
    for name in names:
        if name not in known:
            raise ConfigError(f"no adapter named {name!r}; the model has {_describe(known)}")
    _refuse_if_merged(found, "switching adapters")
    for path, wrapper in found.wrappers:
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ConfigError(f"adapters {owners} each have their own copy of {path}; only one can be active")
    for _, layer in found.layers:
        layer.active_adapters = tuple(n for n in names if n in layer.lora)
    for _, wrapper in found.wrappers:
        wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
    _mark_trainable(model, found, bias=None)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block. Merged layers are unmerged for the duration."""
    found = inventory(model)
    layers = [layer for _, layer in found.layers]
    wrappers = [wrapper for _, wrapper in found.wrappers]
    merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged_adapters}
    for layer in merged:
        layer.unmerge()
    for module in (*layers, *wrappers):
        module.lora_disabled = True
    try:
        yield model
    finally:
        for module in (*layers, *wrappers):
            module.lora_disabled = False
        for layer, names in merged.items():
            layer.merge(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left with no adapter becomes its plain module again."""
    found = inventory(model)
    if name not in _names(found):
        raise ConfigError(f"no adapter named {name!r}; the model has {_describe(_names(found))}")
    for path, layer in found.layers:
        if name in layer.lora:
            layer.delete_adapter(name)
            if not layer.lora:
                replace_module(model, path, layer.plain_module())
    for path, wrapper in found.wrappers:
        if name in wrapper.modules_to_save:
            wrapper.delete_copy(name)
            if not wrapper.modules_to_save:
                replace_module(model, path, wrapper.original_module)


def mark_only_lora_as_trainable(model: nn.Module, bias: str | None = None) -> None:
    """Freeze everything but the active adapters (loralib's function of the same name).

    ``bias`` is loralib's: "none", "all" (every bias in the model) or "lora_only" (the biases of
    adapted layers). Given explicitly, it is also recorded in the active adapters' configs so
    that ``save_adapter`` saves the biases that trained. None keeps each adapter's own setting.
    """
    found = inventory(model)
    if bias is not None:
        if bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_MODES)}; got {bias!r}")
        for name in _active(found):
            config = _config(found, name).replace(bias=bias)
            for _, layer in found.layers:
                if name in layer.lora:
                    layer.lora[name].config = config
    _mark_trainable(model, found, bias=None)


def _mark_trainable(model: nn.Module, found: Inventory, bias: str | None) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for param in _unique(_trainable(model, found, bias)):
        param.requires_grad_(True)


def lora_parameters(model: nn.Module, bias: str | None = None) -> Iterator[nn.Parameter]:
    """The parameters that train: the active adapters' A and B (and DoRA's m), their copies of saved modules,
    and the biases their ``bias`` setting names (or the ``bias`` given here)."""
    return _unique(_trainable(model, inventory(model), bias))


def _unique(params: Iterator[nn.Parameter]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            yield param


def lora_state_dict(model: nn.Module, bias: str | None = None) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that belong to the active adapters (loralib's
    function): load them back with ``model.load_state_dict(sd, strict=False)``."""
    wanted = {id(p) for p in lora_parameters(model, bias)}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in wanted}


def _trainable(model: nn.Module, found: Inventory, bias: str | None) -> Iterator[nn.Parameter]:
    configs: dict[str, LoraConfig] = {}  # each active adapter's config, from the first layer holding it
    for _, layer in found.layers:
        for name in layer.active_adapters:
            configs.setdefault(name, layer.lora[name].config)
            yield layer.lora[name].lora_A
            yield layer.lora[name].lora_B
            if layer.lora[name].magnitude is not None:  # DoRA's m
                yield layer.lora[name].magnitude
    for _, wrapper in found.wrappers:
        if wrapper.active_adapter is not None:
            yield from wrapper.modules_to_save[wrapper.active_adapter].parameters()
    modes = {bias} if bias is not None else {config.bias for config in configs.values()}
    targets = {path for path, layer in found.layers if layer.active_adapters}
    for mode in modes:
        for _, _, param in bias_parameters(model, mode, targets, saved=set()):
            yield param


def _refuse_if_merged(found: Inventory, action: str) -> None:
    for path, layer in found.layers:
        if layer.merged_adapters:
            raise MergeError(f"{action} needs unmerged weights, but {path} has {layer.merged_adapters} merged; "
                             "call lorakit.unmerge(model) first")


def _describe(names: list[str]) -> str:
    return "no adapters" if not names else "adapters " + ", ".join(repr(n) for n in names)
