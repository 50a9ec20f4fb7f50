"""`lorakit quantize`, QA-LoRA training on the quantized base, and `lorakit merge` (exact for QA-LoRA,
float or re-quantized for plain LoRA), with `lorakit eval` agreeing merged and unmerged."""

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.models.base import load_base, load_for_inference
from lorakit.models.quantized import QuantSpec, load_quantized
from lorakit.quant.linear import QuantLinear, quantize_linears, use_int4_kernel
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from tasks import orders

IDS = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base_dir):
    """A QA-LoRA adapter trained on the tiny base quantized to 4 bits, and a plain LoRA one on the float base."""
    directory = tmp_path_factory.mktemp("qalora")
    orders.write_splits(directory, {"train": 8, "test": 4})
    common = {"base": str(tiny_base_dir), "train": str(directory / "train.jsonl"), "val": None, "r": 4,
              "max_steps": 3, "batch_size": 4, "lr": 3e-2, "progress": False}
    train(TrainConfig(output=str(directory / "qalora"), quant_bits=4, quant_group_size=32, **common))
    train(TrainConfig(output=str(directory / "lora"), **common))
    return directory


def _logits(model):
    """On the exact de-quantizing path: these tests check merges, not the int4 kernel's bfloat16."""
    use_int4_kernel(model, False)
    with torch.no_grad():
        return model(IDS).logits


def test_quantize_writes_a_base_that_loads_as_quantized(tiny_base_dir, tmp_path, capsys):
    assert main(["quantize", "--base", str(tiny_base_dir), "--bits", "3", "--output", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "14 linear layers quantized to 3 bits in groups of 32" in out and "float32" in out
    model, _ = load_base(tmp_path / "q")
    reference, _ = load_base(tiny_base_dir, quant=QuantSpec(3, 32))
    assert torch.equal(_logits(model), _logits(reference))


def test_the_qalora_adapter_file_records_its_base(runs):
    config = json.loads((runs / "qalora" / "adapter_config.json").read_text())
    assert (config["use_qalora"], config["qalora_group_size"], config["qalora_bits"]) == (True, 32, 4)
    assert "use_qalora" not in json.loads((runs / "lora" / "adapter_config.json").read_text())


def test_a_qalora_merge_keeps_codes_and_scales_and_the_output(runs, tiny_base_dir, tmp_path, capsys):
    assert main(["merge", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir),
                 "--output", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "4-bit, groups of 32, exact" in out and "relative error" in out
    merged, _ = load_quantized(tmp_path / "merged")
    unmerged, _ = load_for_inference(str(tiny_base_dir), runs / "qalora")  # the quantized base + adapter
    base, _ = load_base(tiny_base_dir, quant=QuantSpec(4, 32))
    for name, layer in base.named_modules():
        if isinstance(layer, QuantLinear):
            after = merged.get_submodule(name)
            assert torch.equal(after.codes, layer.codes) and torch.equal(after.scales, layer.scales), name
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.mins, base.model.layers[0].self_attn.q_proj.mins)
    expected = _logits(unmerged)
    # float16 mins round each shifted min to 2^-11 of itself; this tiny base's weights are ~10x a real
    # model's (initializer_range 0.3), so its logits move more than SmolLM2's (--fp32-mins: below 1e-5).
    assert (_logits(merged) - expected).norm() / expected.norm() < 3e-3
    assert not torch.allclose(expected, _logits(base), atol=1e-3)  # the adapter did change the model


def test_fp32_mins_make_the_merge_tighter(runs, tiny_base_dir, tmp_path, capsys):
    assert main(["merge", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir), "--fp32-mins",
                 "--output", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    merged, _ = load_quantized(tmp_path / "merged")
    unmerged, _ = load_for_inference(str(tiny_base_dir), runs / "qalora")
    expected = _logits(unmerged)
    assert (_logits(merged) - expected).norm() / expected.norm() < 1e-5


def test_eval_scores_the_merged_model_as_the_unmerged_adapter(runs, tiny_base_dir, tmp_path, capsys):
    assert main(["merge", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir), "--fp32-mins",
                 "--output", str(tmp_path / "merged")]) == 0
    data = str(runs / "test.jsonl")
    assert main(["eval", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir), "--unmerged",
                 "--data", data, "--examples", "4", "--exact-4bit"]) == 0
    unmerged = _rows(capsys.readouterr().out, "adapter")
    assert main(["eval", "--base", str(tmp_path / "merged"), "--data", data, "--examples", "4", "--exact-4bit"]) == 0
    merged = _rows(capsys.readouterr().out, "model")
    # The same score and loss, misses by field, and answer to each example.
    assert len(merged) == 5 + any(row.startswith("misses by field") for row in merged) and merged == unmerged


def _rows(report: str, label: str) -> list[str]:
    """The report's lines for ``label`` (its score row, then its answer to each example), label removed."""
    return [" ".join(line.split()[1:]) for line in report.splitlines() if line.strip().startswith(label + " ")]


def test_a_plain_lora_merge_is_a_float_model_or_requantized(runs, tiny_base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--adapter", str(runs / "lora"), "--base", str(tiny_base_dir),
                 "--output", str(tmp_path / "float")]) == 0
    assert "float weights" in capsys.readouterr().out
    unmerged, _ = load_for_inference(str(tiny_base_dir), runs / "lora")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "float")  # transformers alone reads it
    torch.testing.assert_close(_logits(merged), _logits(unmerged), rtol=1e-4, atol=1e-4)

    assert main(["merge", "--adapter", str(runs / "lora"), "--base", str(tiny_base_dir), "--requantize", "4",
                 "--output", str(tmp_path / "q4")]) == 0
    assert "re-quantized" in capsys.readouterr().out
    requantized, _ = load_quantized(tmp_path / "q4")
    assert torch.equal(_logits(requantized), _logits(quantize_linears(merged, 4, 32)))  # the float merge, quantized
    error = (_logits(requantized) - _logits(unmerged)).norm() / _logits(unmerged).norm()
    assert error > 1e-2, error  # re-quantizing moves the weights off what was trained: far from an exact merge


@pytest.mark.parametrize(("extra", "message"), [
    (["--requantize", "4"], "merges exactly into its quantized base"),
    (["--gguf", "x.gguf"], "is not a GGUF base"),
])
def test_merge_mistakes_are_one_line_errors(runs, tiny_base_dir, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / part) if part.endswith(".gguf") else part for part in extra]
    assert main(["merge", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir),
                 "--output", str(tmp_path / "m"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_merge_and_quantize_do_not_overwrite_by_accident(runs, tiny_base_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["merge", "--adapter", str(runs / "lora"), "--base", str(tiny_base_dir), "--gguf", str(tmp_path / "g"),
                 "--output", str(tmp_path / "m")]) == 2
    assert "merge a plain LoRA adapter with --requantize 4 --group-size 32" in capsys.readouterr().err
    for command in (["merge", "--adapter", str(runs / "lora")], ["quantize"]):
        assert main([*command, "--base", str(tiny_base_dir), "--output", str(tmp_path / "taken")]) == 2
        assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(runs / "lora"), "--base", str(tiny_base_dir), "--fp32-mins",
                 "--output", str(tmp_path / "m")]) == 2
    assert "QA-LoRA adapters only" in capsys.readouterr().err


def test_generate_with_a_qalora_adapter_decodes_merged_into_the_4bit_layers(runs, tiny_base_dir, capsys):
    # The merge shifts the mins of the 4-bit layers; decoding then takes the exact path (--exact-4bit),
    # so merged and unmerged replies differ only by the mins' float16 rounding, which greedy decoding
    # of 6 tokens on this tiny model does not reach.
    command = ["generate", "--adapter", str(runs / "qalora"), "--base", str(tiny_base_dir), "--exact-4bit",
               "--max-new-tokens", "6", "one pizza"]
    replies = []
    for extra in ([], ["--unmerged"]):
        assert main([*command, *extra]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()
