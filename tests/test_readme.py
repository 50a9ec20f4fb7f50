"""The README is the front door: its Python runs as written and its `lorakit info` output is real."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_quick_start_runs_and_info_output_matches(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    quick_start = [b for b in blocks if ("import lorakit" in b or "PeftModel" in b) and "imagenet" not in b]
    assert len(quick_start) == 2
    script = tmp_path / "quick_start.py"
    script.write_text("\n".join(quick_start))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out/my-adapter/adapter_model.safetensors").is_file()

    shown = re.search(r"\$ lorakit info out/my-adapter\n(.*?)```", README, flags=re.DOTALL).group(1)
    info = subprocess.run([sys.executable, "-m", "lorakit", "info", "out/my-adapter"], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.splitlines()
    for line in shown.splitlines():
        if line.strip() != "...":
            assert line in info, f"README shows {line!r}, lorakit info prints:\n" + "\n".join(info)


def test_the_vision_example_runs_as_written(tmp_path):
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL) if "imagenet_mobilenet_v2" in b)
    script = tmp_path / "vision.py"
    script.write_text(block + "\nassert type(plain).__name__ == 'MobileNetV2' and not lorakit.adapter_names(plain)\n")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out/my-vision-adapter/adapter_model.safetensors").is_file()
