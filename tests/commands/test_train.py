"""`lorakit train` from the command line: recipe plus flags, resume by output alone, one-line errors."""

import json
import subprocess
import sys

import pytest

from lorakit.cli import main
from tests.conftest import write_orders_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_base_dir):
    return write_orders_recipe(tmp_path_factory.mktemp("recipe"), tiny_base_dir, "tiny.yaml", save_every=0)


def test_train_writes_the_adapter_and_resume_needs_only_the_output(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--output", str(out), "--no-progress", "--stop-after", "2"]) == 0
    assert f"lorakit train --resume --output {out}" in capsys.readouterr().err
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert f"adapter written to {out}" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # four training steps, then the final validation
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(("bad_line", "problem"), [
    ('{"messages": [{"role": "user", "content": "hi"}]', "bad.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "bad.jsonl:2: no assistant message"),
])
def test_bad_data_is_one_line_naming_file_and_line(recipe, tmp_path, bad_line, problem):
    bad = tmp_path / "bad.jsonl"
    good = (recipe.parent / "train.jsonl").read_text().splitlines()[0]
    bad.write_text(f"{good}\n{bad_line}\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", str(recipe), "--train", str(bad),
                             "--output", str(tmp_path / "o"), "--no-progress"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and problem in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--resume", "--max-steps", "--grad-accum", "--gradient-checkpointing", "--lr"):
        assert flag in text
