"""`lorakit eval` and `lorakit generate` on a tiny trained adapter."""

import shutil

import pytest

from lorakit.cli import main
from lorakit.evaluation.evaluate import matches
from lorakit.files.decoding import DECODING_FILE, write_copy_fields
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from tasks import orders


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir):
    directory = tmp_path_factory.mktemp("trained")
    orders.write_splits(directory, {"train": 8, "test": 5})
    train(TrainConfig(base=str(tiny_base_dir), train=str(directory / "train.jsonl"), val=None,
                      output=str(directory / "adapter"), r=4, max_steps=3, batch_size=4, progress=False))
    return directory


def test_eval_scores_base_and_adapter_side_by_side(trained, tiny_base_dir, capsys):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir),
                 "--data", str(trained / "test.jsonl"), "--examples", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{trained / 'test.jsonl'}: 5 examples"
    assert out[2].startswith("base model") and out[3].startswith("adapter")
    assert "/5" in out[2] and "/5" in out[3]
    assert sum(line.startswith("    expected:") for line in out) == 2


def test_eval_runs_its_products_in_the_compute_dtype_it_is_given(trained, tiny_base_dir, capsys):
    command = ["eval", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir), "--no-base",
               "--data", str(trained / "test.jsonl"), "--examples", "0"]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*command, "--compute-dtype", dtype]) == 0
        out = capsys.readouterr().out.splitlines()
        named = " (bfloat16 products)" if dtype == "bfloat16" else ""
        assert out[0] == f"{trained / 'test.jsonl'}: 5 examples{named}"
        losses[dtype] = float(out[2].split()[-1])
    assert losses["bfloat16"] != losses["float32"]  # the products did run in bfloat16 ...
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)  # ... to within its rounding


def test_generate_replies_with_the_adapter(trained, tiny_base_dir, capsys):
    assert main(["generate", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir),
                 "--max-new-tokens", "4", "one pizza", "two pizzas"]) == 0
    out = capsys.readouterr().out
    assert "> one pizza" in out and "> two pizzas" in out


def test_generate_decodes_with_the_adapter_merged_unless_told_unmerged(trained, tiny_base_dir, capsys, monkeypatch):
    from lorakit.core.walk import lora_layers
    from lorakit.generation import generate

    merged_while_decoding, replies = [], []
    original = generate.generate_texts

    def recording(model, *args, **kwargs):
        merged_while_decoding.append({bool(layer.merged_adapters) for _, layer in lora_layers(model)})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_texts", recording)
    command = ["generate", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir),
               "--max-new-tokens", "6", "one pizza"]
    for extra in ([], ["--unmerged"]):
        assert main([*command, *extra]) == 0
        replies.append(capsys.readouterr().out)
    assert merged_while_decoding == [{True}, {False}]
    assert replies[0] == replies[1]  # the same greedy reply either way (merged differs in the last bits only)


def test_eval_and_generate_copy_fields_from_the_message(trained, tiny_base_dir, capsys):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir), "--no-base",
                 "--data", str(trained / "test.jsonl"), "--copy-fields", "item,deliver_to", "--json"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("adapter")
    assert main(["generate", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir),
                 "--max-new-tokens", "4", "--copy-fields", "item", "one pizza"]) == 0
    with pytest.raises(SystemExit) as done:
        main(["eval", "--copy-fields", "item,,size"])
    assert done.value.code == 2 and "give JSON keys separated by commas" in capsys.readouterr().err


def test_generate_copies_the_fields_the_adapter_was_trained_with_unless_told_otherwise(trained, tiny_base_dir,
                                                                                      tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    write_copy_fields(adapter, ["item", "deliver_to"])
    command = ["generate", "--adapter", str(adapter), "--base", str(tiny_base_dir), "--max-new-tokens", "4"]
    assert main([*command, "one pizza"]) == 0
    assert "copying deliver_to,item from the message" in capsys.readouterr().err
    assert main([*command, "--copy-fields", "none", "one pizza"]) == 0
    assert "copying" not in capsys.readouterr().err
    (adapter / DECODING_FILE).write_text("{", encoding="utf-8")  # a damaged record: one line, no traceback
    assert main([*command, "one pizza"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {adapter / DECODING_FILE}: unreadable")


def test_bad_generation_settings_are_one_line(tiny_base_dir, capsys):
    assert main(["generate", "--base", str(tiny_base_dir), "--top-p", "0", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-new-tokens must be")


@pytest.mark.parametrize(("answer", "reference", "expected"), [
    ('{"a": 1, "b": null}', '{"b": null, "a": 1}', True),  # JSON: key order and spacing do not matter
    ('{"a": 1}', '{"a": 2}', False),
    ('{"a": 1} trailing', '{"a": 1}', False),
    ("  Paris\n", "Paris", True),  # text: outer whitespace does not matter
    ("paris", "Paris", False),
])
def test_exact_match(answer, reference, expected):
    assert matches(answer, reference) is expected


def test_chat_keeps_a_conversation_until_exit(trained, tiny_base_dir, monkeypatch, capsys):
    lines = iter(["one pizza", "/reset", "two pizzas", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(trained / "adapter"), "--base", str(tiny_base_dir),
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2
    assert next(lines, None) is None  # every line was read, and /exit ended the session
