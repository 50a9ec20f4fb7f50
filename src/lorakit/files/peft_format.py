"""Adapter directories in PEFT's exact format: adapter_config.json + adapter_model.safetensors.

Keys, with P = "base_model.model." and <path> a module path in the base model:
- linear, conv, GPT-2 Conv1D: P<path>.lora_A.weight (r, in[, k...]) and P<path>.lora_B.weight (out, r[, 1...])
- embedding:                  P<path>.lora_embedding_A (r, vocab) and P<path>.lora_embedding_B (dim, r)
- DoRA's magnitude:           P<path>.lora_magnitude_vector ((out,); (1, out, 1...) for a convolution)
- a trained bias:             P<path>.base_layer.bias for an adapted module, else P<path>.bias
- modules_to_save:            P<path>.<param> with the module's own parameter names
- PEFT also writes the full P<path>.base_layer.weight when an embedding is targeted; lorakit
  accepts it on load (it replaces the base weight, as in PEFT) and never writes it.

An adapter started by PiSSA or OLoRA (which change the base weight) is saved as PEFT's
``path_initial_model_for_weight_conversion`` saves it: a plain LoRA adapter of rank 2r for the
untouched base, A = [A; A0] and B = [B, -B0] (so s * B @ A = s * (B @ A - B0 @ A0), the training's
whole change to the original weight), alpha doubled (times sqrt(2) with rsLoRA) so s stays.

Loading checks every tensor against the model before changing anything: an unknown key, a
missing key, a wrong shape or a rank that disagrees with the config is an AdapterFileError and
the model is left as it was. Pickle files (adapter_model.bin) are refused, never unpickled.

The two files are one unit. The weights file's metadata records a SHA-256 of the config settings
that decide what the tensors compute (rank, alpha, targets, layout...: ``BOUND_SETTINGS``; PEFT
ignores metadata), and a save goes: the new config beside the old one as
``.adapter_config.json.next``, then the new weights over the old (atomic rename), then the new
config over the old. Killed at any point, the directory holds the old pair, or the new weights
beside the new config waiting under its ``.next`` name, which loading recognises by its hash and
completes. Weights whose recorded settings match neither config are an error, never a silent mix
of one save's weights with another's scaling. Other keys (the base model's name, the task type)
may be edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from lorakit.core.adapters import active_adapters, adapter_names, get_adapter_config
from lorakit.core.checks import first_non_finite
from lorakit.core.config import ALL_LINEAR, LoraConfig, module_matcher
from lorakit.core.inject import (
    InjectionPlan,
    apply_plan,
    finish_injection,
    plan_injection,
)
from lorakit.core.layers import Embedding, ModulesToSave, QALoraLinear, lora_class_for
from lorakit.core.layers.dora import magnitude_shape
from lorakit.core.layers.svd_init import is_svd_init
from lorakit.core.walk import bias_parameters, inventory, lora_layers, model_modules
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.atomic import atomic_path, atomic_write_text, fsync_directory
from lorakit.files.peft_config import from_peft_dict, to_peft_dict
from lorakit.quant.linear import QuantLinear

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
NEXT_CONFIG_NAME = ".adapter_config.json.next"  # a save's new config, until its weights are in place
CONFIG_DIGEST = "lorakit.config_digest"  # weights metadata: the hash of the settings they were saved with
TRANSPOSED_MODULES = "lorakit.fan_in_fan_out_modules"  # weights metadata: JSON list of module paths
# The adapter_config.json keys that change what the tensors compute, bound to the weights by hash.
BOUND_SETTINGS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                  "exclude_modules", "fan_in_fan_out", "bias", "modules_to_save", "use_dora", "use_qalora",
                  "qalora_group_size", "qalora_pool", "qalora_bits")
# Keys of other adapter kinds' configs (IA³, prompts, ...) that describe rather than compute: every
# other key of theirs is bound to the weights.
DESCRIPTIVE_SETTINGS = frozenset({"base_model_name_or_path", "task_type", "inference_mode", "peft_version",
                                  "revision", "tokenizer_name_or_path", "auto_mapping"})


# --- keys ----------------------------------------------------------------------------------


def matrix_keys(path: str, is_embedding: bool) -> tuple[str, str]:
    """The file keys of A and B for the adapter on module ``path``."""
    if is_embedding:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def split_adapter_key(key: str) -> tuple[str, str | None, bool]:
    """(module path, "A", "B" or "m" (DoRA's magnitude), is_embedding) for an adapter key with PREFIX
    removed; (key, None, False) for any other tensor (a bias, a saved module's parameter)."""
    for suffix, part, is_embedding in ((".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
                                       (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True),
                                       (".lora_magnitude_vector", "m", False)):
        if key.endswith(suffix):
            return key[: -len(suffix)], part, is_embedding
    return key, None, False


def magnitude_key(path: str) -> str:
    """The file key of DoRA's magnitude vector for the adapter on module ``path``."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def _param_key(path: str, param: str) -> str:
    return f"{PREFIX}{path}.{param}" if path else f"{PREFIX}{param}"


def _bias_key(path: str, wrapped: bool) -> str:
    return _param_key(path, "base_layer.bias" if wrapped else "bias")


def adapter_slots(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters under their file keys: what is saved, and what loading fills."""
    found = inventory(model)  # one walk for the layers, the wrappers and the config
    config = get_adapter_config(model, name, found)
    slots: dict[str, nn.Parameter] = {}
    targets, saved = set(), set()
    for path, layer in found.layers:
        if name in layer.lora:
            a_key, b_key = matrix_keys(path, isinstance(layer, Embedding))
            slots[a_key], slots[b_key] = layer.lora[name].lora_A, layer.lora[name].lora_B
            if layer.lora[name].magnitude is not None:
                slots[magnitude_key(path)] = layer.lora[name].magnitude
            targets.add(path)
    for path, wrapper in found.wrappers:
        if name in wrapper.modules_to_save:
            for param_name, param in wrapper.modules_to_save[name].named_parameters():
                slots[_param_key(path, param_name)] = param
            saved.add(path)
    for path, wrapped, bias in bias_parameters(model, config.bias, targets, saved):
        slots[_bias_key(path, wrapped)] = bias
    return slots


def _expected_shapes(model: nn.Module, plan: InjectionPlan) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) file keys and shapes for injecting ``plan``, from the bare modules."""
    required: dict[str, tuple] = {}
    optional: dict[str, tuple] = {}
    for path, module in plan.targets.items():
        cls = lora_class_for(module)
        a_shape, b_shape = cls.adapter_shapes(module, plan.config.rank_for(path))
        a_key, b_key = matrix_keys(path, issubclass(cls, Embedding))
        required[a_key], required[b_key] = a_shape, b_shape
        if plan.config.use_dora:
            required[magnitude_key(path)] = magnitude_shape(module.weight, cls.weight_is_transposed)
        if isinstance(getattr(module, "weight", None), torch.Tensor):  # a quantized base has none to replace
            optional[_param_key(path, "base_layer.weight")] = tuple(module.weight.shape)
    for path, module in plan.saved.items():
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for param_name, param in original.named_parameters():
            required[_param_key(path, param_name)] = tuple(param.shape)
    for path, wrapped, bias in bias_parameters(model, plan.config.bias, set(plan.targets), set(plan.saved)):
        required[_bias_key(path, wrapped)] = tuple(bias.shape)
    return required, optional


# --- save ----------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` as PEFT does:
    adapter_config.json and adapter_model.safetensors, each written atomically. ``tensors`` (file
    key -> weight) replaces the model's own when those are shards, gathered whole beforehand."""
    name = name if name is not None else _adapter_to_save(model)
    config = get_adapter_config(model, name)
    slots = adapter_slots(model, name)
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.lora]
    config = config.replace(
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        **_qalora_fields(layers),
        base_model_name_or_path=config.base_model_name_or_path or str(getattr(model, "name_or_path", "") or ""),
    )
    tensors = {key: param.detach() for key, param in slots.items()} if tensors is None else tensors
    if tensors.keys() != slots.keys():
        raise ValueError(f"tensors for adapter {name!r} must have exactly its file keys")
    if is_svd_init(config.init):
        config, tensors = _as_plain_lora(config, tensors, name, layers)
    file_config = to_peft_dict(config, _file_targets(model, config, [path for path, _ in layers]))
    transposed = sorted(path for path, layer in layers if layer.fan_in_fan_out)
    return write_adapter_files(directory, file_config, tensors, {TRANSPOSED_MODULES: json.dumps(transposed)})


def _as_plain_lora(config: LoraConfig, tensors: dict[str, torch.Tensor], name: str,
                   layers: list[tuple[str, nn.Module]]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter as the rank-2r plain LoRA adapter that makes the same model from the
    untouched base (the module docstring says how)."""
    tensors = dict(tensors)
    for path, layer in layers:
        adapter = layer.lora[name]
        a_key, b_key = matrix_keys(path, is_embedding=False)
        tensors[a_key] = torch.cat([tensors[a_key], adapter.initial_A.to(tensors[a_key].dtype)], dim=0)
        tensors[b_key] = torch.cat([tensors[b_key], -adapter.initial_B.to(tensors[b_key].dtype)], dim=1)
    factor = 2 ** 0.5 if config.use_rslora else 2
    return config.replace(
        r=2 * config.r, alpha=config.alpha * factor, init="default",
        rank_pattern={pattern: 2 * r for pattern, r in config.rank_pattern.items()},
        alpha_pattern={pattern: alpha * factor for pattern, alpha in config.alpha_pattern.items()},
    ), tensors


def finite_copies(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``tensors`` to save, or AdapterFileError naming one that is not finite."""
    copies = {key: tensor.to("cpu", copy=True).contiguous() for key, tensor in tensors.items()}
    bad = first_non_finite(copies)
    if bad is not None:
        raise AdapterFileError(f"{bad} holds NaN or infinite values; {what} was not saved")
    return copies


def write_adapter_files(directory: str | Path, file_config: dict, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors written as one unit (the protocol above), for
    any adapter kind: ``file_config`` is the JSON object, ``tensors`` the weights by file key."""
    tensors = finite_copies(tensors, "the adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(file_config, indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / NEXT_CONFIG_NAME, config_text)  # 1. the new config, beside the old
    try:
        with atomic_path(directory / WEIGHTS_NAME) as tmp:  # 2. the new weights, naming their config
            metadata = {"format": "pt", CONFIG_DIGEST: _settings_digest(file_config), **(metadata or {})}
            save_file(tensors, str(tmp), metadata=metadata)
    except BaseException:  # the old pair stands; the new config has nothing to wait for
        (directory / NEXT_CONFIG_NAME).unlink(missing_ok=True)
        raise
    os.replace(directory / NEXT_CONFIG_NAME, directory / CONFIG_NAME)  # 3. the new config in place
    fsync_directory(directory)
    return directory


def _settings_digest(data: dict) -> str:
    lora = data.get("peft_type", "LORA") == "LORA"
    bound = {key: data.get(key) for key in (BOUND_SETTINGS if lora else sorted(set(data) - DESCRIPTIVE_SETTINGS))}
    return hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()


def _qalora_fields(layers: list[tuple[str, nn.Module]]) -> dict[str, int | None]:
    """The group size a QA-LoRA adapter pools over and its base's bits (None for plain LoRA),
    one of each for all its layers."""
    qalora = [layer for _, layer in layers if isinstance(layer, QALoraLinear)]
    if not qalora:
        return {"qalora_group_size": None, "qalora_bits": None}
    specs = {(layer.bits, layer.group_size) for layer in qalora}
    if len(specs) > 1 or len(qalora) != len(layers):
        raise ConfigError("a QA-LoRA adapter must adapt quantized layers of one spec only; this one has "
                          f"(bits, group size) {sorted(specs)} and {len(layers) - len(qalora)} unquantized layer(s)")
    bits, group_size = specs.pop()
    return {"qalora_group_size": group_size, "qalora_bits": bits}


def _adapter_to_save(model: nn.Module) -> str:
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    names = adapter_names(model)
    if len(names) == 1:
        return names[0]
    raise ConfigError(f"the model has adapters {names} (active: {list(active)}); pass name= to say which to save")


def _file_targets(model: nn.Module, config: LoraConfig, paths: list[str]) -> str | list[str]:
    """target_modules for the file: the config's own patterns when they select exactly the
    adapted modules, else the module names (or, if short names would also match other modules
    by suffix, a regex of the exact names), so that PEFT adapts exactly these modules."""
    all_paths = [p for p, _ in model_modules(model) if p]
    wanted = set(paths)

    excluded = module_matcher(config.exclude_modules)

    def selects(patterns: str | tuple[str, ...]) -> bool:
        matches = module_matcher(patterns)
        chosen = {p for p in all_paths if matches(p) and not excluded(p)}
        return chosen == wanted

    spec = config.target_modules
    if spec is not None and spec != ALL_LINEAR and selects(spec):
        return spec if isinstance(spec, str) else list(spec)
    names = tuple(sorted(wanted))
    if selects(names):
        return list(names)
    return "(?:" + "|".join(re.escape(p) for p in names) + ")"


# --- read and load -------------------------------------------------------------------------


class AdapterFiles(NamedTuple):
    """An adapter directory read into memory, each file once: what is checked is what is loaded."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # file key -> float tensor on the CPU
    # The modules whose weight is stored (in, out), the transpose of B @ A (GPT-2's Conv1D), as the
    # saving model had them; None when the file does not say (PEFT's files: one flag for all).
    fan_in_fan_out_modules: frozenset[str] | None = None


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of an adapter directory, with a clear error for anything wrong."""
    path = _adapter_dir(directory)
    if not (path / CONFIG_NAME).is_file() and not (path / NEXT_CONFIG_NAME).is_file():
        raise _no_config(path)
    weights = path / WEIGHTS_NAME
    digest = _recorded_digest(_header_metadata(weights)) if weights.is_file() else None
    return _config_for(path, digest)


def _config_for(directory: Path, digest: str | None) -> LoraConfig:
    return from_peft_dict(_config_dict_for(directory, digest), source=str(directory / CONFIG_NAME))


def _config_dict_for(directory: Path, digest: str | None) -> dict:
    """The directory's config as JSON; when the weights record a settings ``digest``, the config they were
    saved with, completing a save that was cut off between its two renames."""
    config_path = directory / CONFIG_NAME
    data = _json_object(config_path.read_bytes(), config_path) if config_path.is_file() else None
    waiting = directory / NEXT_CONFIG_NAME
    if digest is not None and waiting.is_file():
        pending = _json_object(waiting.read_bytes(), waiting)
        if _settings_digest(pending) == digest:  # the weights' own config, left waiting by a cut-off save
            data = pending
            try:  # finish that save, where this process may write
                os.replace(waiting, config_path)
                fsync_directory(directory)
            except OSError:
                pass
    if data is None:
        raise _no_config(directory)
    if digest is not None and _settings_digest(data) != digest:
        raise AdapterFileError(
            f"{directory}: {WEIGHTS_NAME} was saved with other settings than {CONFIG_NAME} gives (r, alpha, "
            "targets...: files of two different saves, or a setting edited by hand); save the adapter again")
    return data


def _no_config(directory: Path) -> AdapterFileError:
    return AdapterFileError(f"{directory}: no {CONFIG_NAME}; an adapter directory holds {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME}")


def _json_object(raw: bytes, path: Path) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: must hold a JSON object")
    return data


def _header_metadata(weights: Path) -> dict[str, str]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from None


def _metadata_of(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes that have already loaded (so the header is sound)."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]).get("__metadata__") or {}


def _recorded_digest(metadata: dict[str, str]) -> str | None:
    return metadata.get(CONFIG_DIGEST)


def read_adapter(directory: str | Path, max_bytes: int | None = None) -> AdapterFiles:
    """A LoRA adapter directory's config and tensors (float, on the CPU), each file read once.
    ``max_bytes`` refuses a weights file larger than that before reading it whole."""
    data, tensors, metadata = read_adapter_files(directory, max_bytes)
    config = from_peft_dict(data, source=str(Path(directory) / CONFIG_NAME))
    transposed = metadata.get(TRANSPOSED_MODULES)
    try:
        transposed = frozenset(json.loads(transposed)) if transposed is not None else None
    except (ValueError, TypeError):
        raise AdapterFileError(f"{directory}: its {TRANSPOSED_MODULES} metadata is not a JSON list") from None
    return AdapterFiles(config, tensors, transposed)


def read_adapter_files(directory: str | Path, max_bytes: int | None = None,
                       ) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json as JSON, the float tensors by key on the CPU, the weights' metadata) of an
    adapter directory of any kind, each file read once, the two checked to belong together."""
    path = _adapter_dir(directory)
    if not (path / CONFIG_NAME).is_file() and not (path / NEXT_CONFIG_NAME).is_file():
        raise _no_config(path)
    weights = _weights_path(directory)
    try:
        with open(weights, "rb") as f:
            # At most one byte past the limit, and never a buffer sized by the limit itself: asked for
            # max_bytes + 1 (a server's limit is ~1 GB), read() allocates all of it (9 ms a load).
            size = os.fstat(f.fileno()).st_size
            raw = f.read() if max_bytes is None else f.read(min(size, max_bytes) + 1)
    except OSError as err:
        raise _unreadable(weights, err) from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise AdapterFileError(f"{weights}: over {max_bytes} bytes, more than any adapter of the allowed rank "
                               "for this model holds")
    try:
        tensors = dict(sorted(load_safetensors(raw).items()))  # in key order, whatever the file's layout
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from None
    metadata = _metadata_of(raw)
    data = _config_dict_for(path, _recorded_digest(metadata))
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFileError(f"{weights}: {key} has dtype {tensor.dtype}; adapter tensors are floating point")
    return data, tensors, metadata


def adapter_base_name(directory: str | Path) -> str:
    """The base model an adapter directory of any kind says it was trained on ("" if it does not say)."""
    return str(_raw_config(directory).get("base_model_name_or_path") or "")


def adapter_kind(directory: str | Path) -> str:
    """The peft_type an adapter directory's config names ("LORA", "IA3", "PROMPT_TUNING", ...)."""
    kind = _raw_config(directory).get("peft_type", "LORA")
    if not isinstance(kind, str):
        raise AdapterFileError(f"{directory}: peft_type in {CONFIG_NAME} must be a string")
    return kind


def _raw_config(directory: str | Path) -> dict:
    """adapter_config.json as JSON, unchecked against the weights (for what it says about itself)."""
    path = _adapter_dir(directory)
    for name in (CONFIG_NAME, NEXT_CONFIG_NAME):
        if (path / name).is_file():
            return _json_object((path / name).read_bytes(), path / name)
    raise _no_config(path)


def read_adapter_header(directory: str | Path) -> tuple[LoraConfig, dict[str, tuple[tuple[int, ...], str]], int]:
    """(config, {key: (shape, dtype)}, file size in bytes) without reading the tensors."""
    config = read_adapter_config(directory)
    weights = _weights_path(directory)
    try:
        with safe_open(str(weights), framework="pt") as f:
            # A safe_open handle is not iterable: .keys() is its only listing.
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118
            header = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from None
    return config, header, weights.stat().st_size


def load_adapter(
    model: nn.Module, source: str | Path | AdapterFiles, name: str = "default", activate: bool = True
) -> nn.Module:
    """Load an adapter (a directory, lorakit's or PEFT's, or one already read with ``read_adapter``)
    into ``model`` as adapter ``name``.

    ``model`` may be a bare base model or already hold other adapters. Everything is checked
    before the model changes; on any error it is left exactly as it was.
    """
    config, tensors, _ = source if isinstance(source, AdapterFiles) else read_adapter(source)
    where = "the adapter" if isinstance(source, AdapterFiles) else str(_weights_path(source))
    plan = plan_injection(model, config, name, activate)
    _check_qalora_fits(config, plan, where)
    required, optional = _expected_shapes(model, plan)
    _check_tensors(tensors, required, optional, where)

    apply_plan(model, plan, init=False)
    slots = adapter_slots(model, name)
    base_weights = {_param_key(path, "base_layer.weight"): model.get_submodule(path).weight for path in plan.targets
                    if _param_key(path, "base_layer.weight") in tensors}
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = slots[key] if key in slots else base_weights[key]
            target.copy_(tensor.to(target.dtype))
    if activate:
        finish_injection(model, name, activate)
    else:  # loaded frozen, the rest of the model left as it was: no walk over every adapter already held
        for param in slots.values():
            param.requires_grad_(False)
    return model


def _check_qalora_fits(config: LoraConfig, plan: InjectionPlan, source: str) -> None:
    """A QA-LoRA adapter goes on quantized layers of its group size, a plain one on plain layers."""
    for path, module in plan.targets.items():
        group = getattr(module, "group_size", None) if isinstance(module, QuantLinear) else None
        if group != config.qalora_group_size:
            want = f"quantized with groups of {config.qalora_group_size}" if config.qalora_group_size else "not quantized"
            have = f"quantized with groups of {group}" if group else "not quantized"
            raise AdapterFileError(f"{source}: the adapter needs {path} {want}, but it is {have}; load it onto "
                                   "the base it was trained on")


def _check_tensors(
    tensors: dict[str, torch.Tensor], required: dict[str, tuple], optional: dict[str, tuple], source: str
) -> None:
    unknown = [k for k in tensors if k not in required and k not in optional]
    if unknown:
        raise AdapterFileError(
            f"{source}: {len(unknown)} tensor(s) match no module of this model, e.g. {_few(unknown)}; "
            "was the adapter made for a different base model?"
        )
    missing = [k for k in required if k not in tensors]
    if missing:
        raise AdapterFileError(f"{source}: {len(missing)} tensor(s) that adapter_config.json calls for are missing, "
                               f"e.g. {_few(missing)}")
    for key, tensor in tensors.items():
        want = required.get(key, optional.get(key))
        got = tuple(tensor.shape)
        if got == want:
            continue
        rank = _rank_mismatch(key, got, want)
        if rank is not None:
            raise AdapterFileError(f"{source}: {key} has rank {rank[0]}, but adapter_config.json gives r={rank[1]} "
                                   "for this module; the config does not belong to these weights")
        raise AdapterFileError(f"{source}: {key} has shape {got}, but this model needs {want}; "
                               "was the adapter made for a different base model?")


def _rank_mismatch(key: str, got: tuple, want: tuple) -> tuple[int, int] | None:
    """(rank in file, rank in config) if the shapes differ only in the rank dimension."""
    if len(got) != len(want):
        return None
    if key.endswith((".lora_A.weight", ".lora_embedding_A")):
        return (got[0], want[0]) if got[1:] == want[1:] else None
    if key.endswith((".lora_B.weight", ".lora_embedding_B")):
        return (got[1], want[1]) if got[0] == want[0] and got[2:] == want[2:] else None
    return None


def _adapter_dir(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.exists():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    if not path.is_dir():
        raise AdapterFileError(f"{directory}: is a file; give the adapter directory that holds {CONFIG_NAME}")
    return path


def _weights_path(directory: str | Path) -> Path:
    path = _adapter_dir(directory)
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    if (path / PICKLE_NAME).exists():
        raise AdapterFileError(
            f"{path}: holds only {PICKLE_NAME}, a pickle, which lorakit never loads (unpickling runs code); "
            f"convert it where you trust it, e.g. with PEFT: save_pretrained(dir, safe_serialization=True)"
        )
    raise AdapterFileError(f"{path}: no {WEIGHTS_NAME}")


def _unreadable(weights: Path, err: Exception) -> AdapterFileError:
    return AdapterFileError(f"{weights}: not a readable safetensors file ({err}); it is truncated or corrupt")


def _few(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (" ..." if len(keys) > 3 else "")
