"""QA-LoRA over group-wise quantized Linear layers: the adapter is a per-group constant update, so
merging shifts the mins only and the merged model, still quantized, computes what the trained one did."""

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.layers import QALoraLinear
from lorakit.quant.linear import QuantLinear, quantize_linears, use_int4_kernel
from tests.conftest import as_peft_writes_it, randomize_adapters


def _llama():
    """A tiny random Llama whose linear layers all have a multiple of 32 inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _model(min_dtype=torch.float16):
    """On the exact de-quantizing path: these tests check the merge's arithmetic, not the int4 kernel's."""
    model = use_int4_kernel(quantize_linears(_llama(), bits=4, group_size=32, min_dtype=min_dtype), False)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)  # the update about as large as the weights themselves
    return model


def test_the_adapter_is_a_weight_update_constant_over_each_group():
    torch.manual_seed(0)
    layer = QALoraLinear.from_base(QuantLinear.from_linear(torch.nn.Linear(64, 24), bits=3, group_size=32))
    layer.add_adapter("default", lorakit.LoraConfig(r=2, alpha=4, target_modules=None))
    layer.active_adapters = ("default",)
    adapter = layer.lora["default"]
    assert adapter.lora_A.shape == (2, 2)  # (r, in / group_size)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(5, 64)
    dense = layer.quantized.dequantize() + layer._delta_weight(adapter)  # (out, in)
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias), rtol=1e-5, atol=1e-5)
    delta = layer._delta_weight(adapter).view(24, 2, 32)
    assert torch.equal(delta, delta[..., :1].expand_as(delta))


@pytest.mark.parametrize(("min_dtype", "tolerance"), [(torch.float16, 1e-3), (torch.float32, 1e-5)])
def test_merging_shifts_only_the_mins_and_keeps_the_output(min_dtype, tolerance):
    model = _model(min_dtype)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids).logits
        with lorakit.disable_adapters(model):
            base = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, QALoraLinear)]
    before = [(m.codes.clone(), m.scales.clone(), m.mins.clone()) for m in layers]
    lorakit.merge(model)
    with torch.no_grad():
        merged = model(ids).logits
    error = (merged - unmerged).norm() / unmerged.norm()
    assert error < tolerance, error
    assert (unmerged - base).norm() / unmerged.norm() > 10 * tolerance  # the adapter does matter
    for m, (codes, scales, mins) in zip(layers, before, strict=True):
        assert torch.equal(m.codes, codes) and torch.equal(m.scales, scales) and not torch.equal(m.mins, mins)
    lorakit.unmerge(model)
    assert all(torch.equal(m.mins, mins) for m, (_, _, mins) in zip(layers, before, strict=True))


def test_merge_and_unload_leaves_a_quantized_model_with_the_same_output():
    model = _model(torch.float32)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, QALoraLinear) for m in plain.modules())
    assert sum(type(m) is QuantLinear for m in plain.modules()) == 2 * 7  # every linear of the 2 layers
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_saved_qalora_adapter_loads_onto_the_same_quantized_base(tmp_path):
    model = _model()
    lorakit.save_adapter(model, tmp_path / "qalora")
    fresh = use_int4_kernel(quantize_linears(_llama(), bits=4, group_size=32), False)
    lorakit.load_adapter(fresh, tmp_path / "qalora")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_training_moves_only_the_adapter():
    model = _model()
    lorakit.mark_only_lora_as_trainable(model)
    layer = next(m for m in model.modules() if isinstance(m, QALoraLinear))
    codes = layer.codes.clone()
    opt = torch.optim.AdamW(lorakit.lora_parameters(model), lr=1e-2)
    ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # A sees only in / 32 pooled features (2 here), so it learns slowly; it learns, and the codes stay.
    assert losses[-1] < 0.95 * losses[0] and torch.equal(layer.codes, codes)


def test_the_file_says_how_the_adapter_pools_and_refuses_the_wrong_base(tmp_path):
    import json

    model = _model()
    lorakit.save_adapter(model, tmp_path / "qalora")
    config = json.loads((tmp_path / "qalora" / "adapter_config.json").read_text())
    assert (config["use_qalora"], config["qalora_group_size"], config["qalora_pool"]) == (True, 32, "sum")
    assert lorakit.read_adapter_config(tmp_path / "qalora").qalora_group_size == 32
    with pytest.raises(lorakit.AdapterFileError, match="quantized with groups of 32, but it is not quantized"):
        lorakit.load_adapter(_llama(), tmp_path / "qalora")
    with pytest.raises(lorakit.AdapterFileError, match="quantized with groups of 32, but it is quantized with groups of 64"):
        lorakit.load_adapter(quantize_linears(_llama(), bits=4, group_size=64), tmp_path / "qalora")

    config["qalora_pool"] = "mean"  # PEFT's convention: merging it as a sum would be wrong
    as_peft_writes_it(tmp_path / "qalora")
    (tmp_path / "qalora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.ConfigError, match="pooled as 'mean'"):
        lorakit.read_adapter_config(tmp_path / "qalora")


def test_a_qalora_adapter_merges_into_a_quantized_state_dict_offline(tmp_path):
    model = _model()
    lorakit.save_adapter(model, tmp_path / "qalora")
    base = quantize_linears(_llama(), bits=4, group_size=32)  # the same base, fresh
    merged = lorakit.merge_adapter_into_state_dict(base.state_dict(), tmp_path / "qalora")
    expected = lorakit.merge_and_unload(model).state_dict()
    assert merged.keys() == expected.keys()
    for key, tensor in merged.items():
        assert torch.equal(tensor, expected[key]), key  # the mins shifted, codes and scales as they were
    assert lorakit.read_adapter_config(tmp_path / "qalora").qalora_bits == 4
    with pytest.raises(lorakit.AdapterFileError, match="quantized state dict .* has no 'model.layers.0"):
        lorakit.merge_adapter_into_state_dict(_llama().state_dict(), tmp_path / "qalora")
