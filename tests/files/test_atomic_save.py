"""An adapter directory is written as one unit: a process killed at any step of a save leaves the
old adapter or the new one, never one save's weights beside another's config; and directories
are replaced without a moment where there is none."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.files.atomic import exchange, replace_directory
from tests.conftest import randomize_adapters, tiny_llama

ROOT = Path(__file__).resolve().parent.parent.parent

# Saves adapter B (same shapes as A, four times its scaling) over ``target``, killed (os._exit, as by
# SIGKILL: nothing more runs) when its file-system step number ``limit`` comes (fsync or rename).
SAVE_B_AND_DIE = """
import os, sys, torch
import lorakit
from tests.conftest import randomize_adapters, tiny_llama
limit, target = int(sys.argv[1]), sys.argv[2]
steps = 0
def counted(real):
    def step(*args, **kwargs):
        global steps
        steps += 1
        if steps == limit:
            os._exit(9)
        return real(*args, **kwargs)
    return step
torch.manual_seed(0)
model = tiny_llama()
lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]))
randomize_adapters(model, seed=1)
os.fsync, os.replace = counted(os.fsync), counted(os.replace)
lorakit.save_adapter(model, target)
print(steps)
"""


def _adapter(alpha: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=alpha, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=seed)
    return model


def _logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    return lorakit.load_adapter(tiny_llama(), directory)(tokens).logits


def test_a_save_killed_at_any_step_leaves_the_old_adapter_or_the_new_one(tmp_path):
    tokens = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    lorakit.save_adapter(_adapter(alpha=8, seed=0), tmp_path / "a")
    lorakit.save_adapter(_adapter(alpha=32, seed=1), tmp_path / "b")
    old, new = _logits(tmp_path / "a", tokens), _logits(tmp_path / "b", tokens)
    assert not torch.equal(old, new)
    outcomes = []
    for limit in range(1, 40):
        target = tmp_path / f"killed-at-{limit}"
        shutil.copytree(tmp_path / "a", target)
        run = subprocess.run([sys.executable, "-c", SAVE_B_AND_DIE, str(limit), str(target)], cwd=ROOT,
                             capture_output=True, text=True, check=False)
        logits = _logits(target, tokens)  # loads cleanly, whatever step it died at
        outcomes.append("old" if torch.equal(logits, old) else "new" if torch.equal(logits, new) else "mixed")
        if run.returncode == 0:  # the save ran to its end without reaching step ``limit``
            assert outcomes[-1] == "new" and int(run.stdout) == limit - 1
            break
        assert run.returncode == 9, run.stderr
    else:
        raise AssertionError("the save never finished")
    assert "mixed" not in outcomes, outcomes
    assert "old" in outcomes[:3] and outcomes.count("new") >= 2  # killed early: old; after the weights: new


def test_a_directory_is_replaced_with_no_moment_without_one(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "file").write_text("0")
    probe = tmp_path / "probe"
    probe.mkdir()
    if not exchange(probe, probe):  # this file system cannot swap two names in one step
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here; replace_directory uses two renames")
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (target / "file").exists():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 200):
            new = tmp_path / f"new-{i}"
            new.mkdir()
            (new / "file").write_text(str(i))
            replace_directory(new, target)
    finally:
        stop.set()
        watcher.join()
    assert (target / "file").read_text() == "199" and not missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe", "target"]  # the old ones are gone


def test_a_crash_between_the_two_renames_is_completed_by_the_next_load(tmp_path):
    """The state a kill after the weights' rename leaves, built by hand: new weights, old config, the
    new config waiting beside it. Loading finds the weights' own config by its hash and puts it in place."""
    lorakit.save_adapter(_adapter(alpha=8, seed=0), tmp_path / "a")
    lorakit.save_adapter(_adapter(alpha=32, seed=1), tmp_path / "b")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes((tmp_path / "b" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "a" / ".adapter_config.json.next").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    assert lorakit.read_adapter_config(tmp_path / "a").alpha == 32
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (tmp_path / "b" / "adapter_config.json").read_bytes()
