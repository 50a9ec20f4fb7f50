"""Finding lorakit's layers in a model by structure (module type), never by parameter name."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lorakit.core.layers import LoraLayer, ModulesToSave


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules()``, but a LoRA layer or a ModulesToSave wrapper is a leaf: what lies
    inside them is lorakit's (adapters, copies), not the user's model."""
    seen: set[int] = set()

    def walk(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield path, module
        if isinstance(module, (LoraLayer, ModulesToSave)):
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{path}.{name}" if path else name)

    yield from walk(model, "")


@dataclass(frozen=True)
class Inventory:
    """lorakit's modules in a model, found in one walk: an operation that needs both kinds (or
    needs them twice) walks the model once."""

    layers: list[tuple[str, LoraLayer]]
    wrappers: list[tuple[str, ModulesToSave]]


def inventory(model: nn.Module) -> Inventory:
    layers, wrappers = [], []
    for path, module in model_modules(model):
        if isinstance(module, LoraLayer):
            layers.append((path, module))
        elif isinstance(module, ModulesToSave):
            wrappers.append((path, module))
    return Inventory(layers, wrappers)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer with its module path."""
    for path, module in model_modules(model):
        if isinstance(module, LoraLayer):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """Every ModulesToSave wrapper with its module path."""
    for path, module in model_modules(model):
        if isinstance(module, ModulesToSave):
            yield path, module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` ("a.b.0.c") inside ``model``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def bias_parameters(
    model: nn.Module, mode: str, targets: set[str], saved: set[str]
) -> Iterator[tuple[str, bool, nn.Parameter]]:
    """The biases an adapter with ``bias=mode`` trains and saves, as (module path, wrapped, bias).

    ``wrapped`` is True for the bias of a module that is (or will be) a LoRA layer, which PEFT
    files as ``<path>.base_layer.bias``. Modules in ``saved`` are skipped: their copies are saved
    whole. Works on a bare model too, for checking a file before injecting (``targets`` then
    names the modules about to become LoRA layers).
    """
    if mode == "none":
        return
    saved_prefixes = tuple(p + "." for p in saved)
    for path, module in model_modules(model):
        if path in saved or path.startswith(saved_prefixes) or isinstance(module, ModulesToSave):
            continue
        bias = module._parameters.get("bias")
        if bias is None:
            continue
        if path in targets:
            yield path, True, bias
        elif mode == "all":
            yield path, isinstance(module, LoraLayer), bias
