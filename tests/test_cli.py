import subprocess
import sys

import lorakit
from lorakit.cli import main
from tests.conftest import tiny_llama


def test_info_describes_targets_ranks_parameters_and_base(tmp_path, capsys):
    model = tiny_llama()
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    lorakit.inject(model, config)
    lorakit.save_adapter(model, tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out
    assert "targets      4 modules" in out
    assert "q_proj           x2    r=4    A (4, 32)  B (32, 4)" in out
    assert "v_proj           x2    r=2    A (2, 32)  B (16, 2)" in out
    expected = sum(p.numel() for p in lorakit.lora_parameters(model))
    assert f"parameters   {expected:,} (F32)" in out


def test_a_bad_directory_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorakit", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'missing'}: no such adapter directory\n"
    assert result.stdout == ""


def test_a_truncated_file_is_reported_not_a_traceback(tmp_path, capsys):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated or corrupt" in err and err.count("\n") == 1


def test_help_lists_the_commands(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def _subcommands() -> list[str]:
    from lorakit.cli import _parser

    parser = _parser()
    action = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and getattr(a, "choices", None))
    return sorted(action.choices)


def test_every_commands_help_prints_its_flags_as_written(capsys):
    """argparse formats help with %: a stray % prints a dict of its internals instead (it did, for
    `train --help`). Every command's help must print cleanly, each flag's text as written."""
    import pytest

    commands = _subcommands()
    assert {"train", "eval", "generate", "chat", "merge", "quantize", "compress", "info", "serve"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "'option_strings'" not in out and "'dest'" not in out and "%(" not in out, command
        assert "--help" in out and "usage: lorakit " + command in out, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "recompute activations in backward: less memory, ~30% slower (default: False)" in flat


def test_float_flags_refuse_nan_and_infinity(capsys):
    import pytest

    for argv in (["train", "--lr", "nan"], ["train", "--weight-decay", "inf"], ["serve", "--request-timeout", "nan"],
                 ["generate", "--temperature=-inf", "hi"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
        assert "give a finite number" in capsys.readouterr().err
