"""The package keeps its floors: each folder imports only from the floors below it (import-linter,
contracts in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_floor_imports_only_from_the_floors_below_it():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "2 kept, 0 broken" in run.stdout


def test_the_lora_linear_forward_and_merge_read_in_one_short_file():
    """A newcomer learns the LoRA maths from one file: the Linear's forward and the merge rules every
    family uses, in at most 200 lines."""
    from lorakit.core.layers import linear

    source = Path(linear.__file__).read_text()
    assert len(source.splitlines()) <= 200
    for name in ("def linear_adapter_update", "class WeightMerging", "def merge(", "def unmerge(", "class Linear("):
        assert name in source
    from lorakit.core.layers import Conv2d, Embedding, Linear

    for family in (Linear, Conv2d, Embedding):
        assert issubclass(family, linear.WeightMerging)
