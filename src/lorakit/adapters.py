"""Several named adapters on one model: list, select, disable, delete; which parameters train.

The loralib helpers live here too: ``mark_only_lora_as_trainable``, ``lora_parameters`` and
``lora_state_dict`` keep loralib's names and ``bias`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.config import BIAS_MODES, LoraConfig
from lorakit.errors import ConfigError, MergeError
from lorakit.walk import bias_parameters, lora_layers, replace_module, saved_modules


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model, in the order first met."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora))
    for _, wrapper in saved_modules(model):
        names.update(dict.fromkeys(wrapper.modules_to_save))
    return list(names)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters that currently add to the model's output."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.active_adapters))
    for _, wrapper in saved_modules(model):
        if wrapper.active_adapter is not None:
            names[wrapper.active_adapter] = None
    return tuple(names)


def get_adapter_config(model: nn.Module, name: str) -> LoraConfig:
    """The LoraConfig adapter ``name`` was created from."""
    for _, layer in lora_layers(model):
        if name in layer.lora:
            return layer.lora[name].config
    raise ConfigError(f"no adapter named {name!r}; the model has {_describe(adapter_names(model))}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up) and the trainable ones."""
    names = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise ConfigError(f"no adapter named {name!r}; the model has {_describe(known)}")
    refuse_if_merged(model, "switching adapters")
    for path, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ConfigError(f"adapters {owners} each have their own copy of {path}; only one can be active")
    for _, layer in lora_layers(model):
        layer.active_adapters = tuple(n for n in names if n in layer.lora)
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
    mark_only_lora_as_trainable(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block. Merged layers are unmerged for the duration."""
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
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
    if name not in adapter_names(model):
        raise ConfigError(f"no adapter named {name!r}; the model has {_describe(adapter_names(model))}")
    for path, layer in list(lora_layers(model)):
        if name in layer.lora:
            layer.delete_adapter(name)
            if not layer.lora:
                replace_module(model, path, layer.plain_module())
    for path, wrapper in list(saved_modules(model)):
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
    if bias is not None:
        if bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_MODES)}; got {bias!r}")
        for name in active_adapters(model):
            _set_adapter_config(model, name, get_adapter_config(model, name).replace(bias=bias))
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model):
        param.requires_grad_(True)


def lora_parameters(model: nn.Module, bias: str | None = None) -> Iterator[nn.Parameter]:
    """The parameters that train: the active adapters' A and B, their copies of saved modules,
    and the biases their ``bias`` setting names (or the ``bias`` given here)."""
    seen: set[int] = set()
    for param in _trainable(model, bias):
        if id(param) not in seen:
            seen.add(id(param))
            yield param


def lora_state_dict(model: nn.Module, bias: str | None = None) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that belong to the active adapters (loralib's
    function): load them back with ``model.load_state_dict(sd, strict=False)``."""
    wanted = {id(p) for p in lora_parameters(model, bias)}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in wanted}


def _trainable(model: nn.Module, bias: str | None) -> Iterator[nn.Parameter]:
    active = active_adapters(model)
    for _, layer in lora_layers(model):
        for name in layer.active_adapters:
            yield layer.lora[name].lora_A
            yield layer.lora[name].lora_B
    for _, wrapper in saved_modules(model):
        if wrapper.active_adapter is not None:
            yield from wrapper.modules_to_save[wrapper.active_adapter].parameters()
    modes = {bias} if bias is not None else {get_adapter_config(model, n).bias for n in active if _has_layers(model, n)}
    targets = {path for path, layer in lora_layers(model) if layer.active_adapters}
    for mode in modes:
        for _, _, param in bias_parameters(model, mode, targets, saved=set()):
            yield param


def _has_layers(model: nn.Module, name: str) -> bool:
    return any(name in layer.lora for _, layer in lora_layers(model))


def _set_adapter_config(model: nn.Module, name: str, config: LoraConfig) -> None:
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.lora[name].config = config


def refuse_if_merged(model: nn.Module, action: str) -> None:
    for path, layer in lora_layers(model):
        if layer.merged_adapters:
            raise MergeError(f"{action} needs unmerged weights, but {path} has {layer.merged_adapters} merged; "
                             "call lorakit.unmerge(model) first")


def _describe(names: list[str]) -> str:
    return "no adapters" if not names else "adapters " + ", ".join(repr(n) for n in names)
