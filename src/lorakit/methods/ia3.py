"""IA³ (Liu et al. 2022): learned per-feature scaling vectors, the smallest of the methods.

On the attention's keys and values (outputs scaled) and on the FFN's inner activation (the input of
its down projection scaled), as PEFT places them for each architecture. A vector starts at ones, so
the model starts unchanged. Folding it into the weight is exact maths: scaling the output of
``x W^T + b`` by l is ``x (diag(l) W)^T + l*b``; scaling the input by l is ``x (W diag(l))^T + b``.

File: PEFT's IA³ format. Keys ``base_model.model.<path>.ia3_l``, shaped (out, 1) where the output is
scaled and (1, in) where the input is (``feedforward_modules``); adapter_config.json with
``peft_type: IA3``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.peft_format import PREFIX, read_adapter_files, write_adapter_files
from lorakit.methods.method import (
    OFF,
    Method,
    MethodSettings,
    check_shapes,
    fill_slots,
    is_off,
)

PARAM = "ia3_l"
# PEFT's placement per architecture: (target modules, of which feed-forward: input scaled).
PLACEMENT = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
}


def _scale_input(module: nn.Linear, args: tuple) -> tuple | None:
    if is_off(module):
        return None
    scale = getattr(module, PARAM).flatten()  # (in,)
    x = args[0]
    return ((x.to(scale.dtype) * scale).to(x.dtype), *args[1:])


def _scale_output(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    if is_off(module):
        return output
    scale = getattr(module, PARAM).flatten()  # (out,): the bias is scaled too, as in PEFT
    return (output.to(scale.dtype) * scale).to(output.dtype)


def add_ia3(module: nn.Linear, feedforward: bool) -> nn.Parameter:
    """Give ``module`` a scaling vector of ones (trainable) and the hook that applies it."""
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"IA³ scales nn.Linear layers; got {type(module).__name__}")
    shape = _vector_shape(module, feedforward)
    dtype = torch.promote_types(module.weight.dtype, torch.float32)
    module.register_parameter(PARAM, nn.Parameter(torch.ones(shape, dtype=dtype, device=module.weight.device)))
    hook = module.register_forward_pre_hook(_scale_input) if feedforward else \
        module.register_forward_hook(_scale_output)
    module._lorakit_ia3 = (feedforward, hook)
    setattr(module, OFF, False)
    return getattr(module, PARAM)


def ia3_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {path: m for path, m in model.named_modules() if hasattr(m, "_lorakit_ia3")}


@torch.no_grad()
def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every scaling vector into its layer's weight (and bias) and remove it: a plain model."""
    for module in ia3_modules(model).values():
        feedforward, hook = module._lorakit_ia3
        scale = getattr(module, PARAM)
        merged = module.weight.to(scale.dtype) * scale  # (out, in) * (1, in) or (out, 1)
        module.weight.copy_(merged.to(module.weight.dtype))
        if not feedforward and module.bias is not None:
            module.bias.copy_((module.bias.to(scale.dtype) * scale.flatten()).to(module.bias.dtype))
        hook.remove()
        del module._parameters[PARAM]
        del module._lorakit_ia3
        delattr(module, OFF)
    return model


def _placement(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLACEMENT:
        raise ConfigError(f"IA³ knows where to go in {', '.join(sorted(PLACEMENT))} models; this one is "
                          f"{model_type!r}")
    return PLACEMENT[model_type]


def _matches(path: str, names: str | list[str] | tuple[str, ...]) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def _chosen(model: nn.Module, targets, feedforward) -> dict[str, nn.Linear]:
    chosen = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(path, targets)}
    if not chosen:
        raise ConfigError(f"IA³: no nn.Linear in the model is named like {targets}")
    return chosen


def _vector_shape(module: nn.Linear, feedforward: bool) -> tuple[int, int]:
    return (1, module.in_features) if feedforward else (module.out_features, 1)


class IA3(Method):
    name = "ia3"
    default_lr = 5e-3
    mergeable = True
    servable = False

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        targets, feedforward = _placement(model)
        return self._attach(model, list(targets), list(feedforward))

    def _attach(self, model: nn.Module, targets, feedforward) -> nn.Module:
        chosen = _chosen(model, targets, feedforward)
        for p in model.parameters():
            p.requires_grad_(False)
        for path, module in chosen.items():
            add_ia3(module, _matches(path, feedforward))
        model._lorakit_ia3_config = {"target_modules": targets, "feedforward_modules": feedforward}
        return model

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{PREFIX}{path}.{PARAM}": getattr(m, PARAM) for path, m in ia3_modules(model).items()}

    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        slots = self.slots(model)
        tensors = {k: p.detach() for k, p in slots.items()} if tensors is None else tensors
        placed = model._lorakit_ia3_config
        config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "inference_mode": True,
                  "base_model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
                  "target_modules": placed["target_modules"], "feedforward_modules": placed["feedforward_modules"],
                  "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None,
                  "exclude_modules": None}
        return write_adapter_files(directory, config, tensors)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        data, tensors, _ = read_adapter_files(directory)
        for key in ("fan_in_fan_out", "modules_to_save", "exclude_modules"):
            if data.get(key):
                raise AdapterFileError(f"{directory}: IA³ with {key}={data[key]!r} is not supported")
        targets, feedforward = data.get("target_modules"), data.get("feedforward_modules") or []
        names = [targets] if isinstance(targets, str) else targets
        if not targets or not isinstance(names, list) or not all(isinstance(n, str) for n in names + feedforward) \
                or not isinstance(feedforward, list):
            raise AdapterFileError(f"{directory}: adapter_config.json needs target_modules (a regex or a list of "
                                   "names) and feedforward_modules (a list of names)")
        try:
            want = {f"{PREFIX}{path}.{PARAM}": _vector_shape(m, _matches(path, feedforward))
                    for path, m in _chosen(model, targets, feedforward).items()}
        except ConfigError as err:
            raise AdapterFileError(f"{directory}: {err}") from None
        check_shapes(directory, tensors, want)
        self._attach(model, targets, feedforward)
        fill_slots(self.slots(model), tensors)
        return model
