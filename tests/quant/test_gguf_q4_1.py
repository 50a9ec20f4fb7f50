"""GGUF Q4_1 blocks read as group-wise 4-bit weights equal the GGUF reference de-quantization."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lorakit.quant.gguf_q4_1 import q4_1_weight, read_llama_q4_1


def test_q4_1_blocks_dequantize_as_gguf_does():
    data = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    raw = quantize(data, GGMLQuantizationType.Q4_1)  # (24, 4 blocks * 20 bytes)
    weight = q4_1_weight(raw)
    assert weight.shape == (24, 128) and weight.bits == 4 and weight.group_size == 32
    reference = dequantize(raw, GGMLQuantizationType.Q4_1)
    assert np.array_equal(weight.dequantize().numpy(), reference)  # bit for bit


def test_the_embedded_smollm2_reads_as_transformers_loads_it(smollm2):
    model, path = smollm2
    weights = read_llama_q4_1(path)
    assert len(weights) == 30 * 7
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        expected = model.get_submodule(name).weight
        assert torch.equal(weights[name].dequantize(), expected), name  # q_proj/k_proj rows un-permuted too


@pytest.fixture(scope="module")
def smollm2():
    from lorakit.models.base import embedded_gguf_path, load_base

    return load_base()[0], embedded_gguf_path()
