"""lorakit export --gguf-lora: a plain LoRA adapter as llama.cpp's LoRA GGUF, read back here with
gguf-py; the update each layer applies in llama.cpp's row order is the adapter's own."""

import pytest
import torch

import lorakit
from lorakit.adapter_math.gguf_lora import export_gguf_lora, gguf_tensor_name
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.files.peft_format import read_adapter
from lorakit.models.base import embedded_gguf_path
from lorakit.quant.gguf_q4_1 import rope_order
from tests.conftest import randomize_adapters

HEADS, KV_HEADS = 9, 3  # SmolLM2-135M's, as its GGUF says


def _smollm2_shaped(layers: int = 2):
    """A random Llama with SmolLM2-135M's widths and head counts (its first ``layers`` layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _saved_adapter(tmp_path, **config):
    model = _smollm2_shaped()
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **config}))
    randomize_adapters(model, std=0.05)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _read_gguf(path):
    from gguf import GGUFReader

    from lorakit.quant.gguf_q4_1 import field_value

    reader = GGUFReader(str(path))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    fields = {key: field_value(reader, key) for key in ("general.type", "general.architecture", "adapter.type",
                                                         "adapter.lora.alpha")}
    return fields, tensors, {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}


@pytest.mark.parametrize("config", [{}, {"use_rslora": True},
                                    {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 3.0}}],
                         ids=["plain", "rslora", "patterns"])
def test_every_layer_applies_the_adapters_update_in_llama_cpp_row_order(tmp_path, config):
    model, directory = _saved_adapter(tmp_path, **config)
    export_gguf_lora(read_adapter(directory), embedded_gguf_path(), tmp_path / "a.gguf")
    fields, tensors, shapes = _read_gguf(tmp_path / "a.gguf")
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == ("adapter", "llama", "lora")
    alpha = float(fields["adapter.lora.alpha"])
    checked = 0
    for path, layer in lorakit.core.walk.lora_layers(model):
        adapter = layer.lora["default"]
        name = gguf_tensor_name(path)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rank = a.shape[0]
        assert shapes[f"{name}.lora_a"] == (layer.in_features, rank)  # ne: innermost first, as llama.cpp checks
        assert shapes[f"{name}.lora_b"] == (rank, layer.out_features)
        update_in_gguf_rows = (alpha / rank) * b @ a  # what llama.cpp adds to its weight's rows
        expected = adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
        kind = name.split(".")[2]
        if kind in ("attn_q", "attn_k"):
            order = rope_order(layer.out_features, HEADS if kind == "attn_q" else KV_HEADS)
            update_in_gguf_rows = update_in_gguf_rows[order]  # back to transformers' rows
        torch.testing.assert_close(update_in_gguf_rows, expected, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == 2 * 7 and len(tensors) == 2 * checked


def test_q_and_k_rows_are_permuted_and_the_rest_are_not(tmp_path):
    model, directory = _saved_adapter(tmp_path)
    export_gguf_lora(read_adapter(directory), embedded_gguf_path(), tmp_path / "a.gguf")
    _, tensors, _ = _read_gguf(tmp_path / "a.gguf")
    for path, name in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q"), ("model.layers.0.self_attn.v_proj",
                                                                              "blk.0.attn_v")):
        b = model.get_submodule(path).lora["default"].lora_B.detach()
        same = torch.equal(tensors[f"{name}.weight.lora_b"], b)
        assert same == (name == "blk.0.attn_v")


def _refused(tmp_path, adapter_config, match, model=None):
    model = model or _smollm2_shaped()
    lorakit.inject(model, lorakit.LoraConfig(**adapter_config))
    randomize_adapters(model, std=0.05)
    lorakit.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=match):
        export_gguf_lora(read_adapter(tmp_path / "adapter"), embedded_gguf_path(), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_adapters_llama_cpp_cannot_run_are_refused_with_the_way_out(tmp_path):
    _refused(tmp_path / "dora", {"r": 2, "target_modules": ["q_proj"], "use_dora": True}, "no DoRA")
    _refused(tmp_path / "embed", {"r": 2, "target_modules": ["embed_tokens"]}, "embedding adapter")
    _refused(tmp_path / "head", {"r": 2, "target_modules": ["lm_head"]}, "decoder's linear layers only")
    _refused(tmp_path / "saved", {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
             "saves whole modules")


def test_a_qalora_adapter_is_refused_with_a_pointer_to_merge(tmp_path):
    from lorakit.quant.linear import quantize_linears

    model = quantize_linears(_smollm2_shaped(1), bits=4, group_size=32)
    _refused(tmp_path, {"r": 2, "target_modules": ["q_proj"]}, "lorakit merge .* --gguf", model)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    _refused(tmp_path, {"r": 2, "target_modules": ["q_proj"]}, "export for the base it was trained on", other)


def test_the_command_writes_the_file_and_refuses_to_overwrite(tmp_path, capsys):
    _, directory = _saved_adapter(tmp_path)
    output = tmp_path / "orders.gguf"
    assert main(["export", "--gguf-lora", str(directory), "--output", str(output)]) == 0
    assert "14 layers, alpha 8" in capsys.readouterr().out
    written = output.read_bytes()
    assert main(["export", "--gguf-lora", str(directory), "--output", str(output)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == written
    assert main(["export", "--gguf-lora", str(directory), "--output", str(tmp_path / "x.bin")]) == 2
    assert "name the file .gguf" in capsys.readouterr().err


def test_a_nan_or_truncated_adapter_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, directory = _saved_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={})
    output = tmp_path / "a.gguf"
    assert main(["export", "--gguf-lora", str(directory), "--output", str(output)]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not output.exists()
    weights.write_bytes(weights.read_bytes()[:1000])  # cut off mid-file
    assert main(["export", "--gguf-lora", str(directory), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not output.exists()
