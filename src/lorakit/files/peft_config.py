"""adapter_config.json, PEFT's form of a LoraConfig: its field names, and every key accounted for.

lorakit writes what PEFT writes for a config, with the exact module names it adapted, and reads
what lorakit or PEFT wrote. A PEFT feature lorakit does not implement is an error naming the key
(never silently dropped: that would run a different model than the one trained), keys that
describe the file are skipped, and any other key is accepted only at its "off" value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.core.config import LoraConfig
from lorakit.errors import ConfigError

QALORA_POOL = "sum"  # lorakit's QA-LoRA sums the input over each quantization group


def to_peft_dict(config: LoraConfig, target_modules: str | list[str]) -> dict[str, Any]:
    """The adapter_config.json content PEFT writes for ``config``.

    ``target_modules`` is what the file names as targets: the resolved module names when
    the config said "all-linear" or the layers were built by hand, so PEFT adapts exactly
    the modules lorakit did.
    """
    qalora = {"use_qalora": True, "qalora_group_size": config.qalora_group_size, "qalora_pool": QALORA_POOL,
              "qalora_bits": config.qalora_bits} if config.qalora_group_size else {}
    return qalora | {
        "alpha_pattern": dict(config.alpha_pattern),
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": config.bias,
        "exclude_modules": _patterns_to_json(config.exclude_modules),
        "fan_in_fan_out": config.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True if config.init == "default" else config.init,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": config.alpha,
        "lora_bias": False,
        "lora_dropout": config.dropout,
        "modules_to_save": _patterns_to_json(config.modules_to_save),
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "revision": None,
        "target_modules": target_modules,
        "task_type": config.task_type,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
    }

def from_peft_dict(data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """Read an adapter_config.json written by lorakit or PEFT.

    Every key is accounted for: a PEFT feature lorakit does not implement (layer selection,
    files of PiSSA-style inits saved against the changed base weights, ...) is an error naming the
    key, never silently dropped, because ignoring it would run a different model.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(f"{source}: peft_type is {peft_type!r}, and this takes LoRA adapters only (lorakit eval, "
                          "generate, chat and merge also take IA3, prompt and prefix tuning and bottleneck adapters)")
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
    return LoraConfig(
        r=data["r"],
        alpha=data["lora_alpha"],
        dropout=data.get("lora_dropout", 0.0),
        target_modules=data.get("target_modules"),
        exclude_modules=data.get("exclude_modules"),
        bias=data.get("bias", "none"),
        modules_to_save=data.get("modules_to_save"),
        use_rslora=data.get("use_rslora", False),
        use_dora=data.get("use_dora", False),
        init=_init_from_peft(data.get("init_lora_weights", True), source),
        rank_pattern=data.get("rank_pattern") or {},
        alpha_pattern=data.get("alpha_pattern") or {},
        fan_in_fan_out=data.get("fan_in_fan_out", False),
        base_model_name_or_path=data.get("base_model_name_or_path") or "",
        task_type=data.get("task_type"),
        qalora_group_size=data.get("qalora_group_size") if qalora else None,
        qalora_bits=data.get("qalora_bits") if qalora else None,
    )


# adapter_config.json keys lorakit maps onto LoraConfig fields.
_PEFT_KEYS_READ = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save",
    "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "base_model_name_or_path", "task_type", "peft_type", "use_qalora", "qalora_group_size", "qalora_pool",
    "qalora_bits", "use_dora",
}
# Keys that describe the file, not the maths.
_PEFT_KEYS_METADATA = {"peft_version", "revision", "inference_mode", "auto_mapping", "megatron_core"}
_PEFT_UNSUPPORTED = {
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
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that "
            "(lorakit's own PiSSA/OLoRA adapters are saved converted)"
        )
    raise ConfigError(f"{source}: unknown init_lora_weights={value!r}")


def _patterns_to_json(value: str | tuple[str, ...] | None) -> str | list[str] | None:
    return list(value) if isinstance(value, tuple) else value
