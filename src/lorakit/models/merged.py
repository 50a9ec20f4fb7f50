"""Deploying an adapter: merge it into its base and write a model that needs no lorakit to run.

LoRA and IA³ adapters merge (IA³'s scaling vectors fold into their layers' weights exactly);
prompt, prefix and bottleneck adapters cannot, and are refused with the reason.

A QA-LoRA adapter merges exactly into its quantized base (each group's min moves, codes and scales
stay), so the result is still N-bit. A plain LoRA adapter merges into float weights, written as an
ordinary transformers model, or re-quantized afterwards (QLoRA's way, which moves the weights off
the grid they were trained on). Either way the merged model's logits are compared with the
unmerged adapter's on a probe sentence, and a 4-bit, group-32 result can also be written as a
GGUF Q4_1 file for llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.core.config import LoraConfig
from lorakit.core.merge import merge_and_unload
from lorakit.errors import ConfigError
from lorakit.files.atomic import atomic_directory
from lorakit.files.peft_format import read_adapter_config
from lorakit.methods.ia3 import merge_ia3
from lorakit.methods.method import method_of_directory
from lorakit.models.base import gguf_source, load_for_inference
from lorakit.models.gguf_export import export_q4_1_gguf
from lorakit.models.quantized import QuantSpec, quantized_spec, save_quantized
from lorakit.quant.linear import quantize_linears, widen_mins

PROBE = "A customer writes: please send two boxes of green tea and one teapot to 12 Elm Street by Friday."


@dataclass(frozen=True)
class MergeReport:
    output: Path
    spec: QuantSpec | None  # the merged model's quantization; None: float weights
    requantized: bool
    probe_error: float  # |merged - unmerged| / |unmerged| over the probe sentence's logits
    gguf_template: Path | None  # the base GGUF whose metadata the exported GGUF copies


def check_merge_settings(config: LoraConfig, requantize: int | None, group_size: int, gguf: Path | None,
                         fp32_mins: bool) -> None:
    """A clear error for a combination that cannot be written, before any model is loaded."""
    if gguf is not None and (config.modules_to_save or config.bias != "none"):
        raise ConfigError("GGUF export replaces linear weights only; this adapter also trains "
                          f"{'modules_to_save' if config.modules_to_save else 'biases'}")
    merged_spec = ((config.qalora_bits or 4, config.qalora_group_size) if config.qalora_group_size
                   else (requantize, group_size))
    if gguf is not None and merged_spec != (4, 32):
        raise ConfigError("GGUF Q4_1 holds 4-bit weights in groups of 32; "
                          + ("this QA-LoRA adapter's base is not" if config.qalora_group_size
                             else "merge a plain LoRA adapter with --requantize 4 --group-size 32 to export it"))
    if requantize and config.qalora_group_size:
        raise ConfigError("a QA-LoRA adapter merges exactly into its quantized base; leave out --requantize")
    if fp32_mins and (gguf is not None or not config.qalora_group_size):
        raise ConfigError("--fp32-mins applies to QA-LoRA adapters written to lorakit's format; "
                          "leave out --gguf (Q4_1 stores float16 mins)" if config.qalora_group_size
                          else "--fp32-mins applies to QA-LoRA adapters only; this is a plain LoRA adapter")


def merge_to_directory(base: str | None, adapter: str | Path, output: Path, requantize: int | None = None,
                       group_size: int = 32, gguf: Path | None = None, fp32_mins: bool = False,
                       overwrite: bool = False) -> MergeReport:
    """Merge ``adapter`` into ``base`` and write the merged model to ``output`` (and ``gguf``)."""
    for path in (output, gguf):
        if path is not None and path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    method = method_of_directory(adapter)
    if method.name == "full":
        raise ConfigError(f"{adapter} is already a whole model (full fine-tuning); there is nothing to merge")
    if not method.mergeable:
        raise ConfigError(f"{adapter} is a {method.name} adapter, which cannot be merged into the weights (its "
                          "virtual tokens or bottleneck layers stay beside them); use it unmerged, with --adapter")
    if method.name == "lora":
        check_merge_settings(read_adapter_config(adapter), requantize, group_size, gguf, fp32_mins)
    elif fp32_mins:
        raise ConfigError("--fp32-mins applies to QA-LoRA adapters only")
    template = gguf_source(base) if gguf is not None else None
    # The probe measures the merge, so both sides compute on the exact de-quantizing path (float32), not
    # with a kernel's order of summation or bfloat16 rounding; the saved model is the same either way.
    model, tokenizer = load_for_inference(base, adapter, exact_4bit=True)
    model = model.cpu()
    if fp32_mins:
        widen_mins(model)
    probe = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(probe).logits.float()
        model = merge_and_unload(model) if method.name == "lora" else merge_ia3(model)
        if requantize:
            quantize_linears(model, requantize, group_size)
        after = model(probe).logits.float()
    error = ((after - before).norm() / before.norm()).item()

    spec = quantized_spec(model)
    if spec is not None:
        save_quantized(model, tokenizer, output)
    else:
        with atomic_directory(output) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    if gguf is not None:
        export_q4_1_gguf(model, template, gguf)
    return MergeReport(output, spec, bool(requantize), error, template)
