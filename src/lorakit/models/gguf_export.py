"""Writing a merged 4-bit model back to GGUF Q4_1, for llama.cpp and transformers' GGUF loader.

The GGUF file the base came from is the template: its metadata (architecture, tokenizer, chat
template) and every tensor that is not a linear weight are copied as they are, and each Q4_1
linear weight is replaced by the model's own blocks: its codes and scales (unchanged by a
QA-LoRA merge) and its mins (shifted by it). Nothing is re-quantized. Rows of q_proj and k_proj
are put back in llama.cpp's rotary order, the inverse of what reading undid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.files.atomic import atomic_path
from lorakit.quant.gguf_q4_1 import BLOCK, LLAMA_LINEARS, llama_heads, rope_order
from lorakit.quant.groupwise import QuantizedWeight, unpack_codes
from lorakit.quant.linear import QuantLinear


def q4_1_blocks(weight: QuantizedWeight) -> np.ndarray:
    """A 4-bit, group-32 weight with fp16 scales and mins as (rows, in / 32 * 20) bytes of Q4_1
    blocks: scale, min, then byte j holding element j (low nibble) and element j + 16 (high)."""
    if (weight.bits, weight.group_size) != (4, BLOCK) or {weight.scales.dtype, weight.mins.dtype} != {torch.float16}:
        raise ConfigError(f"GGUF Q4_1 holds 4-bit weights in groups of {BLOCK} with float16 scales and mins; "
                          f"this weight is {weight.bits}-bit in groups of {weight.group_size} "
                          f"({weight.scales.dtype} scales, {weight.mins.dtype} mins)")
    rows, cols = weight.shape
    codes = unpack_codes(weight.codes.cpu(), 4, cols).view(rows, cols // BLOCK, BLOCK)
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # (rows, n_blocks, 16)
    scale = weight.scales.cpu().contiguous().view(torch.uint8).view(rows, -1, 2)
    low = weight.mins.cpu().contiguous().view(torch.uint8).view(rows, -1, 2)
    return torch.cat([scale, low, nibbles], dim=-1).reshape(rows, -1).numpy()


def export_q4_1_gguf(model: nn.Module, template: str | Path, output: str | Path) -> Path:
    """Write ``model`` (a Llama whose linear layers are 4-bit, group-32 QuantLinear layers, read
    from ``template`` and since changed only in those layers) as a GGUF file at ``output``."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(template))
    heads, kv_heads = llama_heads(reader, template, "GGUF export")
    output = Path(output)
    with atomic_path(output) as tmp:
        writer = GGUFWriter(str(tmp), "llama")
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":  # written by the writer itself
                continue
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type)
        for tensor in reader.tensors:
            data = tensor.data
            parts = tensor.name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in LLAMA_LINEARS:
                if tensor.tensor_type != GGMLQuantizationType.Q4_1:
                    raise ConfigError(f"{template}: {tensor.name} is {tensor.tensor_type.name}, not Q4_1")
                data = _linear_blocks(model, f"model.layers.{parts[1]}.{LLAMA_LINEARS[parts[2]]}", parts[2],
                                      heads, kv_heads)
                if data.shape != tensor.data.shape:
                    raise ConfigError(f"{tensor.name}: the model's weight does not fit the template's shape")
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output


def _linear_blocks(model: nn.Module, path: str, kind: str, heads: int, kv_heads: int) -> np.ndarray:
    layer = model.get_submodule(path)
    if not isinstance(layer, QuantLinear):
        raise ConfigError(f"{path} is not a quantized layer; GGUF export writes merged 4-bit models "
                          "(merge a QA-LoRA adapter, or re-quantize a merged float model first)")
    weight = layer.quantized
    if kind in ("attn_q", "attn_k"):
        order = rope_order(weight.shape[0], heads if kind == "attn_q" else kv_heads)
        weight = QuantizedWeight(*(torch.empty_like(t).index_copy_(0, order, t)  # row order[r] of GGUF <- row r
                                   for t in (weight.codes, weight.scales, weight.mins)),
                                 weight.bits, weight.group_size, weight.shape)
    return q4_1_blocks(weight)
