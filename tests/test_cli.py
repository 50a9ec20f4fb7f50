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
