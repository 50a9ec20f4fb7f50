"""GGUF Q4_1 weights read directly as group-wise 4-bit weights, without an fp32 copy.

A Q4_1 block is 20 bytes for 32 consecutive weights of one row along the input dimension:
fp16 scale d, fp16 min m, then 16 bytes of nibbles, the low nibbles holding elements 0..15 and
the high ones 16..31; a weight is d * q + m. That is exactly a group of lorakit's group-wise
quantization with 4 bits and group size 32 (and a QA-LoRA group), so the codes, scales and mins
are taken over as they are.

llama.cpp's converter permutes the rows of q_proj and k_proj (for its rotary layout); reading
undoes it, as transformers' GGUF loader does. A whole row moves, with its scales and mins, so
nothing is re-quantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit.errors import ConfigError
from lorakit.quant.groupwise import QuantizedWeight, pack_codes

BLOCK = 32  # weights per Q4_1 block
BLOCK_BYTES = 20

# GGUF tensor name (after "blk.N.") -> the module path in transformers' Llama (after "model.layers.N.")
LLAMA_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


def q4_1_weight(raw: np.ndarray) -> QuantizedWeight:
    """A (rows, in / 32 * 20) uint8 array of Q4_1 blocks as a QuantizedWeight (rows, in)."""
    rows, width = raw.shape
    if width % BLOCK_BYTES:
        raise ConfigError(f"a Q4_1 row of {width} bytes is not a whole number of {BLOCK_BYTES}-byte blocks")
    # A copy of the packed bytes (5 bits a weight), not of weights: GGUFReader hands out a read-only memory map.
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(rows, width // BLOCK_BYTES, BLOCK_BYTES)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # (rows, n_blocks)
    mins = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    nibbles = blocks[..., 4:]  # (rows, n_blocks, 16)
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # elements 0..15, then 16..31
    cols = codes.shape[1] * BLOCK
    return QuantizedWeight(pack_codes(codes.reshape(rows, cols), 4), scales, mins, 4, BLOCK, (rows, cols))


def read_llama_q4_1(path: str | Path) -> dict[str, QuantizedWeight]:
    """Every Q4_1 linear weight of a Llama-family GGUF file, by transformers module path
    ("model.layers.0.self_attn.q_proj"), rows in transformers' order."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    heads, kv_heads = llama_heads(reader, path, "reading Q4_1 weights directly")
    weights = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.N.<kind>.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LLAMA_LINEARS:
            continue
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            raise ConfigError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, not Q4_1")
        weight = q4_1_weight(tensor.data)
        if parts[2] in ("attn_q", "attn_k"):
            weight = _permute_rows(weight, rope_order(weight.shape[0], heads if parts[2] == "attn_q" else kv_heads))
        weights[f"model.layers.{parts[1]}.{LLAMA_LINEARS[parts[2]]}"] = weight
    return weights


def rope_order(rows: int, heads: int) -> torch.Tensor:
    """Row r of transformers' weight is row order[r] of the GGUF one (llama.cpp's permute, undone)."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def _permute_rows(weight: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(weight.codes[order], weight.scales[order], weight.mins[order], weight.bits,
                           weight.group_size, weight.shape)


def llama_heads(reader, path: str | Path, what: str) -> tuple[int, int]:
    """(attention heads, key/value heads) of a GGUF file that must be a llama for ``what``."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: architecture {arch!r}; {what} supports llama only")
    heads = int(field_value(reader, "llama.attention.head_count"))
    return heads, int(field_value(reader, "llama.attention.head_count_kv") or heads)


def field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value[0]
