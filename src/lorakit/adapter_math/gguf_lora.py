"""A plain LoRA adapter as a llama.cpp LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora FILE.gguf`).

llama.cpp's adapter file (read by its llama-adapter.cpp) is a GGUF with
  general.type = "adapter", general.architecture = the base's, adapter.type = "lora",
  adapter.lora.alpha (float32; llama.cpp scales each layer by alpha / rank, the rank read from
  that layer's A), and per adapted weight "blk.N.<kind>.weight.lora_a" / ".lora_b".
GGUF lists dimensions innermost first, so A stored as a (r, in) array has ne = [in, r] and B as
(out, r) has ne = [r, out]: PEFT's own shapes, no transpose. llama.cpp checks them against the
base tensor's ne = [in, out].

Two things differ from lorakit's view of the same adapter:
- llama.cpp's Llama converter permutes the rows of attn_q and attn_k (its rotary layout); those
  rows are B's rows, so B is permuted the same way (A, over the input, is not);
- one alpha for the whole file: a layer whose scale differs from alpha / its rank (rank_pattern,
  alpha_pattern) has the ratio folded into its B, so s * B @ A is unchanged everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.adapter_math.updates import LayerUpdate, layer_updates
from lorakit.core.checks import all_finite
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.atomic import atomic_path
from lorakit.files.peft_format import AdapterFiles
from lorakit.quant.gguf_q4_1 import LLAMA_LINEARS, llama_heads, rope_order

_KIND_OF_PATH = {path: kind for kind, path in LLAMA_LINEARS.items()}
_LAYER_PATH = re.compile(r"model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)")


@dataclass
class GgufLoraReport:
    output: Path
    layers: int
    alpha: float
    folded: int  # layers whose scale was folded into B


def gguf_tensor_name(module_path: str) -> str:
    """transformers' Llama module path -> llama.cpp's weight name ("model.layers.3.mlp.up_proj" ->
    "blk.3.ffn_up.weight"); ConfigError for a module llama.cpp adapters cannot reach."""
    match = _LAYER_PATH.fullmatch(module_path)
    if match is None or match.group(2) not in _KIND_OF_PATH:
        raise ConfigError(f"the adapter has a layer on {module_path}; a llama.cpp LoRA GGUF holds adapters on "
                          f"the decoder's linear layers only ({', '.join(sorted(_KIND_OF_PATH))})")
    return f"blk.{match.group(1)}.{_KIND_OF_PATH[match.group(2)]}.weight"


def export_gguf_lora(adapter: AdapterFiles, base_gguf: str | Path, output: str | Path) -> GgufLoraReport:
    """Write ``adapter`` (read with read_adapter) as a llama.cpp LoRA GGUF for the base ``base_gguf``."""
    from gguf import GGUFReader, GGUFWriter

    _refuse_what_llama_cpp_cannot_run(adapter)
    updates = layer_updates(adapter, "the adapter")  # in layer order
    for update in updates:
        _check_linear_update(update)
    reader = GGUFReader(str(base_gguf))
    heads, kv_heads = llama_heads(reader, base_gguf, "a llama.cpp LoRA export")
    base_shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ne: (in, out)

    alpha = updates[0].scaling * updates[0].r  # llama.cpp's scale alpha / r is then exact for the first layer
    tensors, folded = {}, 0
    for update in updates:
        path, a, b, rank = update.path, update.lora_A, update.lora_B, update.r
        name = gguf_tensor_name(path)
        out_features, in_features = b.shape[0], a.shape[1]
        if base_shapes.get(name) != (in_features, out_features):
            raise ConfigError(f"{path}: the adapter is ({out_features} x {in_features}) but {base_gguf} has "
                              f"{name} {base_shapes.get(name, 'missing')} (ne order); export for the base it was "
                              "trained on")
        b = b.float()
        fold = update.scaling / (alpha / rank)
        if fold != 1.0:
            b, folded = b * fold, folded + 1
        kind = name.split(".")[2]
        if kind in ("attn_q", "attn_k"):
            order = rope_order(out_features, heads if kind == "attn_q" else kv_heads)
            b = torch.empty_like(b).index_copy_(0, order, b)  # row order[r] of GGUF <- row r
        tensors[f"{name}.lora_a"] = a.float().contiguous().numpy()
        tensors[f"{name}.lora_b"] = b.contiguous().numpy()

    output = Path(output)
    with atomic_path(output) as tmp:
        writer = GGUFWriter(str(tmp), "llama")
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for name, data in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufLoraReport(output, len(updates), float(alpha), folded)


def _refuse_what_llama_cpp_cannot_run(adapter: AdapterFiles) -> None:
    config = adapter.config
    if config.qalora_group_size is not None:
        raise ConfigError("this is a QA-LoRA adapter (its A sums each quantization group), which llama.cpp's "
                          "LoRA loader cannot run; merge it instead: lorakit merge --adapter DIR --output OUT "
                          "--gguf FILE.gguf writes the merged 4-bit model as a GGUF")
    if config.use_dora:
        raise ConfigError("llama.cpp runs no DoRA adapters (its magnitude vector has no place in a LoRA GGUF); "
                          "merge it instead (lorakit merge) and convert the merged model")
    if config.modules_to_save:
        raise ConfigError(f"the adapter also saves whole modules ({', '.join(config.modules_to_save)}), which a "
                          "llama.cpp LoRA GGUF cannot hold; merge it instead (lorakit merge)")


def _check_linear_update(update: LayerUpdate) -> None:
    """A linear layer's (r, in) A and (out, r) B, finite: what a llama.cpp LoRA tensor pair can hold."""
    if update.embedding:
        raise ConfigError(f"the adapter holds an embedding adapter ({update.path}), which this export does not "
                          "write (it takes A and B of the decoder's linear layers); merge it instead (lorakit merge)")
    if update.lora_A.dim() != 2 or update.lora_B.shape != (update.lora_B.shape[0], update.r):
        raise AdapterFileError(f"{update.path}: A {tuple(update.lora_A.shape)} and B {tuple(update.lora_B.shape)} "
                               "are not the (r, in) and (out, r) matrices of a linear layer's adapter")
    if not (all_finite(update.lora_A) and all_finite(update.lora_B)):
        raise AdapterFileError(f"{update.path}: holds NaN or infinite values; nothing was written")
