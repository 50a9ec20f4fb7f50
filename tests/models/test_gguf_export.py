"""Writing 4-bit weights back as GGUF Q4_1: blocks byte-exact, and a merged QA-LoRA SmolLM2 that
transformers' GGUF loader reads back with the logits lorakit computes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

import lorakit
from lorakit.errors import ConfigError
from lorakit.models.gguf_export import export_q4_1_gguf, q4_1_blocks
from lorakit.quant.gguf_q4_1 import q4_1_weight
from lorakit.quant.groupwise import quantize_weight
from tests.conftest import randomize_adapters


def test_q4_1_blocks_are_the_bytes_they_were_read_from():
    data = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    raw = quantize(data, GGMLQuantizationType.Q4_1)
    assert np.array_equal(q4_1_blocks(q4_1_weight(raw)), raw)


@pytest.mark.parametrize(("bits", "group_size", "min_dtype"), [(3, 32, torch.float16), (4, 64, torch.float16),
                                                               (4, 32, torch.float32)])
def test_weights_q4_1_cannot_hold_are_refused(bits, group_size, min_dtype):
    weight = quantize_weight(torch.randn(8, 128), bits, group_size, min_dtype=min_dtype)
    with pytest.raises(ConfigError, match="GGUF Q4_1 holds 4-bit weights in groups of 32"):
        q4_1_blocks(weight)


def test_a_merged_qalora_smollm2_reads_back_from_gguf_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.models.base import embedded_gguf_path, load_base
    from lorakit.models.quantized import QuantSpec
    from lorakit.quant.linear import use_int4_kernel

    model, tokenizer = load_base(quant=QuantSpec(4, 32))
    use_int4_kernel(model, False)  # the merge's own arithmetic, in float32 (transformers' reader computes in it too)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.02)
    ids = tokenizer("Two boxes of green tea to 12 Elm Street.", return_tensors="pt").input_ids
    with torch.no_grad():
        unmerged = model(ids).logits
        model = lorakit.merge_and_unload(model)
        merged = model(ids).logits
    # Each layer stays within 1e-3 (tests/quant/test_qalora.py); through 30 layers the float16 rounding
    # of the shifted mins adds up to about 1.2e-3 of the logits.
    assert (merged - unmerged).norm() / unmerged.norm() < 2e-3

    export_q4_1_gguf(model, embedded_gguf_path(), tmp_path / "merged.gguf")
    reread = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="merged.gguf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reread(ids).logits, merged, rtol=1e-5, atol=1e-5)
