"""Injecting adapters: choose the target modules, swap in LoRA layers, freeze the base.

Injection is split in two so that loading a file can check everything first and change the
model only when nothing can fail: ``plan_injection`` looks, ``apply_plan`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.core.adapters import mark_only_lora_as_trainable, set_adapter
from lorakit.core.config import ALL_LINEAR, LoraConfig, module_matcher
from lorakit.core.layers import (
    SUPPORTED_TYPES,
    LoraLayer,
    ModulesToSave,
    is_linear,
    lora_class_for,
)
from lorakit.core.walk import model_modules, replace_module
from lorakit.errors import ConfigError, MergeError, TargetError


@dataclass
class InjectionPlan:
    """What injecting one adapter will do, found without changing the model."""

    name: str
    config: LoraConfig
    targets: dict[str, nn.Module] = field(default_factory=dict)  # path -> module getting a LoRA adapter
    saved: dict[str, nn.Module] = field(default_factory=dict)  # path -> module getting a trainable copy


def inject(
    model: nn.Module, config: LoraConfig | None = None, name: str = "default", activate: bool = True
) -> nn.Module:
    """Add adapter ``name`` to the modules ``config`` targets, freeze everything else, and
    (with ``activate``) make it the active adapter. Returns ``model``, changed in place."""
    plan = plan_injection(model, config or LoraConfig(), name, activate)
    apply_plan(model, plan)
    finish_injection(model, name, activate)
    return model


def plan_injection(model: nn.Module, config: LoraConfig, name: str, activate: bool = True) -> InjectionPlan:
    """Find the modules adapter ``name`` would adapt and copy, or raise TargetError/ConfigError."""
    _check_adapter_name(name)
    if config.target_modules is None:
        raise TargetError("target_modules is None; name the modules to adapt, e.g. target_modules='all-linear'")
    modules = [(path, module) for path, module in model_modules(model) if path]  # the root is never a target
    if activate:
        merged = [(p, m) for p, m in modules if isinstance(m, LoraLayer) and m.merged_adapters]
        if merged:
            raise MergeError(f"adding an active adapter needs unmerged weights, but {merged[0][0]} has "
                             f"{merged[0][1].merged_adapters} merged; call lorakit.unmerge(model) first")
    plan = InjectionPlan(name, config)
    head = _output_head(model)
    excluded = module_matcher(config.exclude_modules)
    targeted = None if config.target_modules == ALL_LINEAR else module_matcher(config.target_modules)
    for path, module in modules:
        if isinstance(module, ModulesToSave):
            continue
        if excluded(path):
            continue
        if targeted is None:  # all-linear
            if module is head or not is_linear(module):
                continue
        elif not targeted(path):
            continue
        if lora_class_for(module) is None:
            raise TargetError(
                f"target_modules={_show(config.target_modules)} matches {path} ({type(module).__name__}), "
                f"but lorakit adapts only {SUPPORTED_TYPES}; use a narrower pattern"
            )
        if isinstance(module, LoraLayer) and name in module.lora:
            raise ConfigError(f"{path} already has an adapter named {name!r}; pick another name or delete it first")
        lora_class_for(module).check_variant(config, tuple(module.lora) if isinstance(module, LoraLayer) else ())
        plan.targets[path] = module
    if not plan.targets:
        raise TargetError(
            f"target_modules={_show(config.target_modules)} matches no module of {type(model).__name__}; "
            f"adaptable modules here include: {_examples(model)}"
        )
    for pattern in config.modules_to_save or ():
        saves = module_matcher((pattern,))
        matches = {p: m for p, m in modules if saves(p)}
        if not matches:
            raise TargetError(f"modules_to_save entry {pattern!r} matches no module of {type(model).__name__}")
        for path, module in matches.items():
            if path in plan.targets or isinstance(module, LoraLayer):
                raise TargetError(f"{path} is both adapted by LoRA and in modules_to_save; choose one")
            if isinstance(module, ModulesToSave) and name in module.modules_to_save:
                raise ConfigError(f"{path} already has a copy for adapter {name!r}")
            plan.saved[path] = module
    return plan


def apply_plan(model: nn.Module, plan: InjectionPlan, init: bool = True) -> None:
    """Swap in LoRA layers and copies as planned. ``init=False`` leaves A and B unset, for a caller
    that fills every one of them from a file."""
    for path, module in plan.targets.items():
        layer = module if isinstance(module, LoraLayer) else lora_class_for(module).from_base(module)
        if layer is not module:
            replace_module(model, path, layer)
        layer.add_adapter(
            plan.name, plan.config, r=plan.config.rank_for(path), scaling=plan.config.scaling_for(path), init=init
        )
    for path, module in plan.saved.items():
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            replace_module(model, path, wrapper)
        wrapper.add_copy(plan.name)


def finish_injection(model: nn.Module, name: str, activate: bool) -> None:
    """Activate the new adapter if asked, then freeze all but the active adapters."""
    if activate:
        set_adapter(model, name)
    else:
        mark_only_lora_as_trainable(model)


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module "all-linear" leaves out: the model's output embeddings (a causal LM's lm_head).
    A model without transformers' get_output_embeddings() has no head to leave out."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    return get_output_embeddings() if callable(get_output_embeddings) else None


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")


def _show(patterns: str | tuple[str, ...]) -> str:
    return repr(patterns) if isinstance(patterns, str) else repr(list(patterns))


def _examples(model: nn.Module) -> str:
    names = [p for p, m in model_modules(model) if p and lora_class_for(m) is not None]
    if not names:
        return f"none (lorakit adapts {SUPPORTED_TYPES})"
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
