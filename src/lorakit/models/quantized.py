"""Whole models with group-wise quantized Linear layers: made from a float model or straight from
GGUF Q4_1 blocks, saved as a model directory, loaded back.

A quantized model directory is an ordinary transformers one (config.json, tokenizer files) whose
model.safetensors holds, for each quantized layer, ``<path>.codes`` (packed uint8),
``<path>.scales`` and ``<path>.mins`` instead of ``<path>.weight``, plus every other tensor as
usual. ``lorakit_quantization.json`` names the layers and the format, so a loader knows what to
build; transformers alone cannot load it (its weights are not floats), lorakit can.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.core.walk import replace_module
from lorakit.errors import ConfigError
from lorakit.files.model_directory import WEIGHTS, write_model_directory
from lorakit.quant.groupwise import QuantizedWeight, QuantSpec
from lorakit.quant.int8_head import use_int8_grid_head
from lorakit.quant.linear import QuantLinear, quantize_linears

QUANT_CONFIG = "lorakit_quantization.json"
FORMAT = "lorakit-groupwise"


def quantize_model(model: nn.Module, spec: QuantSpec, gguf: str | Path | None = None) -> nn.Module:
    """Replace the model's Linear layers (all but lm_head) by QuantLinear layers, in place.

    With ``gguf`` (the file the float model was read from) and a 4-bit, group-32 spec, the layers
    take the file's Q4_1 blocks as they are: no re-quantization, and the weights are exactly the
    ones the float model holds. Otherwise the float weights are quantized. The head stays float; it
    is multiplied from 8-bit codes when decoding where it lies exactly on an 8-bit grid, as GGUF's
    Q8_0 heads do (quant/int8_head.py).
    """
    if gguf is not None and (spec.bits, spec.group_size) == (4, 32):
        from lorakit.quant.gguf_q4_1 import read_llama_q4_1

        for path, weight in read_llama_q4_1(gguf).items():
            linear = model.get_submodule(path)
            replace_module(model, path, QuantLinear(weight, linear.bias))
    else:
        quantize_linears(model, spec.bits, spec.group_size)
    return use_int8_grid_head(model)


def quantized_spec(model: nn.Module) -> QuantSpec | None:
    """The spec of a model's QuantLinear layers (None if it has none); one spec per model."""
    specs = {(m.bits, m.group_size) for m in model.modules() if isinstance(m, QuantLinear)}
    if len(specs) > 1:
        raise ConfigError(f"the model mixes quantization specs {sorted(specs)}; lorakit saves one per model")
    return QuantSpec(*specs.pop()) if specs else None


def save_quantized(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write a quantized model directory (see the module docstring), atomically."""
    spec = quantized_spec(model)
    if spec is None:
        raise ConfigError("the model has no quantized layers to save; quantize it first")
    layers = [path for path, m in model.named_modules() if isinstance(m, QuantLinear)]
    description = {"format": FORMAT, "bits": spec.bits, "group_size": spec.group_size, "layers": layers}
    return write_model_directory(model, tokenizer, directory, QUANT_CONFIG, description)


def is_quantized_directory(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def load_quantized(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a quantized model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    description = _read_description(directory)
    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(directory / WEIGHTS))
    for path in description["layers"]:
        linear = model.get_submodule(path)
        codes, scales, mins = (tensors[f"{path}.{part}"] for part in ("codes", "scales", "mins"))
        weight = QuantizedWeight(codes, scales, mins, description["bits"], description["group_size"],
                                 (linear.out_features, linear.in_features))
        bias = tensors.get(f"{path}.bias")
        replace_module(model, path, QuantLinear(weight, bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {key for key in missing if _is_tied(model, key)}
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{directory / WEIGHTS}: does not match its config.json (missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    use_int8_grid_head(model)
    model.requires_grad_(False)
    model.name_or_path = model.config._name_or_path = description["base_model_name_or_path"] or str(directory)
    return model.eval(), AutoTokenizer.from_pretrained(str(directory))


def _read_description(directory: Path) -> dict:
    try:
        description = json.loads((directory / QUANT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{directory / QUANT_CONFIG}: cannot be read ({err})") from None
    if description.get("format") != FORMAT:
        raise ConfigError(f"{directory / QUANT_CONFIG}: format {description.get('format')!r}, expected {FORMAT!r}")
    QuantSpec(description["bits"], description["group_size"])
    return description


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is the output head that transformers ties to the input embedding."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key == "lm_head.weight"
