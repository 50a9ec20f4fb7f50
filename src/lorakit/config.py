"""LoraConfig: what to adapt and how, validated on construction, and its adapter_config.json form.

The maths (Hu et al. 2021, "LoRA", section 4.1): a frozen weight W gains a low-rank update
W' = W + s * B @ A with A of shape (r, in), B of shape (out, r) and s = alpha / r, or
s = alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski 2023, "rsLoRA").

On disk the config is PEFT's adapter_config.json (see docs/ARCHITECTURE.md, "Files"), so the
field names differ there: ``alpha`` is ``lora_alpha``, ``dropout`` is ``lora_dropout``, and
``init`` is ``init_lora_weights``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian")
QALORA_POOL = "sum"  # lorakit's QA-LoRA sums the input over each quantization group


@dataclass(frozen=True)
class LoraConfig:
    """How to inject LoRA adapters into a model. Invalid values raise ``ConfigError`` at once."""

    r: int = 8
    """Rank of the update: A is (r, in), B is (out, r)."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    target_modules: str | tuple[str, ...] | None = ALL_LINEAR
    """Which modules get adapters: "all-linear" (every nn.Linear / GPT-2 Conv1D except the
    output head), a list of module names or name suffixes ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), or a regex that must match a whole module name.
    None is allowed only for layers built directly (lorakit.Linear(...)), not for inject()."""
    exclude_modules: str | tuple[str, ...] | None = None
    """Modules never adapted, even if target_modules matches them; same forms as target_modules."""
    bias: str = "none"
    """Which biases train and are saved with the adapter: "none", "all", or "lora_only"
    (only the biases of adapted layers), as in loralib."""
    modules_to_save: tuple[str, ...] | None = None
    """Modules (names or suffixes) trained in full and saved with the adapter, e.g. a new
    classifier head. Each adapter gets its own copy; the original stays frozen."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r."""
    init: str = "default"
    """"default": A kaiming-uniform, B zeros (embeddings: A zeros, B normal, as loralib).
    "gaussian": A normal with std 1/r, B zeros. Either way the model starts unchanged."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex: r}, the regex matching the end of a module name."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same form as rank_pattern."""
    fan_in_fan_out: bool = False
    """Set when saving if an adapted layer stores its weight as (in, out) (GPT-2's Conv1D);
    read by merge_adapter_into_state_dict, which has no modules to look at."""
    base_model_name_or_path: str = ""
    """Recorded in adapter_config.json so a reader knows which base the adapter belongs to."""
    task_type: str | None = None
    """PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...), recorded for PEFT's loader."""
    qalora_group_size: int | None = None
    """Set when saving a QA-LoRA adapter (one over lorakit's QuantLinear layers): the quantization
    group its A sums the input over. Recorded with "qalora_pool": "sum", because a merge depends on
    the pooling convention and PEFT's differs (a mean scaled by the number of groups)."""
    qalora_bits: int | None = None
    """Set with qalora_group_size: the bits of the quantized base the adapter was trained on, so
    a loader given the float base can quantize it the same way."""

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        _check_positive_number("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self._set("target_modules", _normalise_patterns("target_modules", self.target_modules))
        self._set("exclude_modules", _normalise_patterns("exclude_modules", self.exclude_modules))
        if self.target_modules is None and self.exclude_modules is not None:
            raise ConfigError("exclude_modules needs target_modules to exclude from")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_MODES)}; got {self.bias!r}")
        if self.modules_to_save is not None:
            names = _normalise_patterns("modules_to_save", self.modules_to_save)
            if isinstance(names, str):
                raise ConfigError(f"modules_to_save must be a list of module names, got the string {names!r}")
            self._set("modules_to_save", names)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init not in INIT_MODES:
            raise ConfigError(f"init must be one of {', '.join(INIT_MODES)}; got {self.init!r}")
        for pattern, rank in self.rank_pattern.items():
            _check_regex(f"rank_pattern key {pattern!r}", pattern)
            _check_positive_int(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_regex(f"alpha_pattern key {pattern!r}", pattern)
            _check_positive_number(f"alpha_pattern[{pattern!r}]", alpha)
        for name in ("qalora_group_size", "qalora_bits"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        self._set("rank_pattern", dict(self.rank_pattern))
        self._set("alpha_pattern", dict(self.alpha_pattern))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: normalise once, here

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    # --- per-module rank and scaling -------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on ``module_name``: a rank_pattern match, else r."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on ``module_name``: an alpha_pattern match, else alpha."""
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """s in W' = W + s * B @ A for the adapter on ``module_name``."""
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # --- adapter_config.json (PEFT's field names) ------------------------------------------

    def to_peft_dict(self, target_modules: str | list[str]) -> dict[str, Any]:
        """The adapter_config.json content PEFT writes for this config.

        ``target_modules`` is what the file names as targets: the resolved module names when
        the config said "all-linear" or the layers were built by hand, so PEFT adapts exactly
        the modules lorakit did.
        """
        qalora = {"use_qalora": True, "qalora_group_size": self.qalora_group_size, "qalora_pool": QALORA_POOL,
                  "qalora_bits": self.qalora_bits} if self.qalora_group_size else {}
        return qalora | {
            "alpha_pattern": dict(self.alpha_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": _patterns_to_json(self.exclude_modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True if self.init == "default" else self.init,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": self.alpha,
            "lora_bias": False,
            "lora_dropout": self.dropout,
            "modules_to_save": _patterns_to_json(self.modules_to_save),
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": target_modules,
            "task_type": self.task_type,
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read an adapter_config.json written by lorakit or PEFT.

        Every key is accounted for: a PEFT feature lorakit does not implement (DoRA, layer
        selection, PiSSA-style inits that change the base weights, ...) is an error naming the
        key, never silently dropped, because ignoring it would run a different model.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only")
        for key, value in data.items():
            if key in _PEFT_KEYS_READ or key in _PEFT_KEYS_METADATA:
                continue
            if _is_inert(value):
                continue
            reason = _PEFT_UNSUPPORTED.get(key, "lorakit does not implement it")
            raise ConfigError(f"{source}: {key}={value!r} is not supported ({reason})")
        if "r" not in data or "lora_alpha" not in data:
            raise ConfigError(f"{source}: missing 'r' or 'lora_alpha'; is this a LoRA adapter_config.json?")
        qalora = data.get("use_qalora") is True
        if qalora and data.get("qalora_pool") != QALORA_POOL:
            pooled = f"pooled as {data['qalora_pool']!r}" if "qalora_pool" in data else \
                "from PEFT (its input pooled as a mean times the number of groups)"
            raise ConfigError(f"{source}: a QA-LoRA adapter {pooled}; lorakit reads QA-LoRA adapters that sum the "
                              f"input over each group (qalora_pool: {QALORA_POOL!r}), since merging depends on it")
        return cls(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save"),
            use_rslora=data.get("use_rslora", False),
            init=_init_from_peft(data.get("init_lora_weights", True), source),
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            fan_in_fan_out=data.get("fan_in_fan_out", False),
            base_model_name_or_path=data.get("base_model_name_or_path") or "",
            task_type=data.get("task_type"),
            qalora_group_size=data.get("qalora_group_size") if qalora else None,
            qalora_bits=data.get("qalora_bits") if qalora else None,
        )


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_matches(patterns: str | tuple[str, ...], module_name: str) -> bool:
    """PEFT's matching rule: a string is a regex over the whole name; a list entry matches the
    name itself or any name ending in "." + entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


# adapter_config.json keys lorakit maps onto LoraConfig fields.
_PEFT_KEYS_READ = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save",
    "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "base_model_name_or_path", "task_type", "peft_type", "use_qalora", "qalora_group_size", "qalora_pool",
    "qalora_bits",
}
# Keys that describe the file, not the maths.
_PEFT_KEYS_METADATA = {"peft_version", "revision", "inference_mode", "auto_mapping", "megatron_core"}
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA is not implemented in lorakit yet",
    "lora_bias": "a trainable bias on lora_B is not implemented in lorakit",
    "layers_to_transform": "layer selection by index is not implemented; list the module names instead",
    "layers_pattern": "layer selection by index is not implemented; list the module names instead",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not implemented",
    "trainable_token_indices": "trainable tokens are not implemented",
    "layer_replication": "layer replication is not implemented",
    "ensure_weight_tying": "weight tying of saved modules is not implemented",
}
_INIT_CHANGES_BASE = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _is_inert(value: Any) -> bool:
    """True for the values PEFT writes for a feature that is off."""
    return value is None or value is False or value == {} or value == []


def _init_from_peft(value: Any, source: str) -> str:
    if value is True or value is False or value in ("orthogonal", "eva"):
        # These inits only set A and B, which the file's tensors then replace.
        return "default"
    if value == "gaussian":
        return "gaussian"
    if isinstance(value, str) and value.lower().startswith(_INIT_CHANGES_BASE):
        raise ConfigError(
            f"{source}: init_lora_weights={value!r} also changes the base weights, so the adapter "
            "only works on that modified base; convert it to a plain LoRA adapter with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that"
        )
    raise ConfigError(f"{source}: unknown init_lora_weights={value!r}")


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's rule: the first key whose regex matches the end of the name, at a "." boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _normalise_patterns(field_name: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{field_name} is an empty string; give module names, a regex or 'all-linear'")
        if value != ALL_LINEAR:
            _check_regex(field_name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not names:
            raise ConfigError(f"{field_name} is an empty list; name at least one module or use None")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{field_name} entries must be non-empty strings, got {name!r}")
        return names
    raise ConfigError(f"{field_name} must be a string or a list of strings, got {type(value).__name__}")


def _patterns_to_json(value: str | tuple[str, ...] | None) -> str | list[str] | None:
    return list(value) if isinstance(value, tuple) else value


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{name} is not a valid regular expression ({err}): {pattern!r}") from None
