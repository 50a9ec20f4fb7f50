"""LoraConfig: what to adapt and how, validated on construction, and its adapter_config.json form.

The maths (Hu et al. 2021, "LoRA", section 4.1): a frozen weight W gains a low-rank update
W' = W + s * B @ A with A of shape (r, in), B of shape (out, r) and s = alpha / r, or
s = alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski 2023, "rsLoRA"). DoRA (``use_dora``)
also learns each output unit's length (core/layers/dora.py); PiSSA and OLoRA (``init``) start A and
B from the weight's own factors (core/layers/svd_init.py).

On disk the config is PEFT's adapter_config.json, read and written by lorakit.files.peft_config,
where the field names differ: ``alpha`` is ``lora_alpha``, ``dropout`` is ``lora_dropout``, and
``init`` is ``init_lora_weights``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.core.checks import check_int, check_number
from lorakit.errors import ConfigError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora")


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
    use_dora: bool = False
    """DoRA (Liu et al. 2024): W' = m * (W + s * B @ A) / ||W + s * B @ A|| per output unit, m trained
    too. Linear and convolution layers."""
    init: str = "default"
    """"default": A kaiming-uniform, B zeros (embeddings: A zeros, B normal, as loralib).
    "gaussian": A normal with std 1/r, B zeros. Either way the model starts unchanged.
    "pissa" (or "pissa_niter_N", a randomised SVD with N iterations) and "olora": A and B from the
    weight's SVD or QR, their product taken out of the base weight; the saved file is converted to
    a plain LoRA adapter for the untouched base. Linear layers."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex: r}, the regex matching the end of a module name."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same form as rank_pattern."""
    fan_in_fan_out: bool = False
    """Set when saving if an adapted layer stores its weight as (in, out) (GPT-2's Conv1D), as PEFT
    sets it. lorakit's files also name those layers, so only a state-dict merge of PEFT's files
    reads this flag."""
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
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
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
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.init, str) or not (self.init in INIT_MODES or re.fullmatch(r"pissa_niter_[0-9]+", self.init)):
            raise ConfigError(f"init must be one of {', '.join(INIT_MODES)}; got {self.init!r}")
        for pattern, rank in self.rank_pattern.items():
            _check_regex(f"rank_pattern key {pattern!r}", pattern)
            check_int(f"rank_pattern[{pattern!r}]", rank, minimum=1)
        for pattern, alpha in self.alpha_pattern.items():
            _check_regex(f"alpha_pattern key {pattern!r}", pattern)
            check_number(f"alpha_pattern[{pattern!r}]", alpha, low=0, low_open=True)
        for name in ("qalora_group_size", "qalora_bits"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
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


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_matcher(patterns: str | tuple[str, ...] | None) -> Callable[[str], bool]:
    """PEFT's matching rule, as a test of module names: a string is a regex over the whole name; a
    list entry matches the name itself or any name ending in "." + entry; None matches nothing."""
    if patterns is None:
        return lambda module_name: False
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return lambda module_name: regex.fullmatch(module_name) is not None
    # The same rule as a set lookup per dotted suffix of the name: a saved adapter lists every
    # adapted module (210 for SmolLM2), and checking each entry per module cost 18 ms a load.
    names = frozenset(patterns)

    def matches(module_name: str) -> bool:
        dot = -1
        while True:  # the name, then each suffix after a "."
            if module_name[dot + 1:] in names:
                return True
            dot = module_name.find(".", dot + 1)
            if dot == -1:
                return False

    return matches


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


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{name} is not a valid regular expression ({err}): {pattern!r}") from None
