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

# Saves adapter B (same shapes as A, four times its scaling) over a target directory, killed (os._exit,
# as by SIGKILL: nothing more runs) when its file-system step number ``limit`` comes (fsync or rename).
# One process imports torch and lorakit once and forks a child per save, asked for on stdin as
# "LIMIT TARGET"; it answers each with the child's exit status and, when the save ran to its end, the
# number of steps it took ("-" otherwise). A fresh interpreter per save cost 8 s of imports each.
SAVE_B_AND_DIE = """
import os, sys, traceback
import torch
import lorakit
from tests.conftest import randomize_adapters, tiny_llama

def save_b(limit, target):
    steps = 0
    def counted(real):
        def step(*args, **kwargs):
            nonlocal steps
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
    return steps

tiny_llama()  # transformers' Llama imported here once, not in every child
for request in sys.stdin:
    limit, target = request.rstrip("\\n").split(" ", 1)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            os.write(write, str(save_b(int(limit), target)).encode())
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as steps:
        counted = steps.read().decode() or "-"
    _, status = os.waitpid(child, 0)
    print(os.waitstatus_to_exitcode(status), counted, flush=True)
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
    saver = subprocess.Popen([sys.executable, "-c", SAVE_B_AND_DIE], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        for limit in range(1, 40):
            target = tmp_path / f"killed-at-{limit}"
            shutil.copytree(tmp_path / "a", target)
            saver.stdin.write(f"{limit} {target}\n")
            saver.stdin.flush()
            answer = saver.stdout.readline().split()
            assert len(answer) == 2, "the saving process died (its error is above)"
            status, steps = int(answer[0]), answer[1]
            logits = _logits(target, tokens)  # loads cleanly, whatever step it died at
            outcomes.append("old" if torch.equal(logits, old) else "new" if torch.equal(logits, new) else "mixed")
            if status == 0:  # the save ran to its end without reaching step ``limit``
                assert outcomes[-1] == "new" and int(steps) == limit - 1
                break
            assert status == 9, f"the save failed otherwise than killed (exit status {status})"
        else:
            raise AssertionError("the save never finished")
    finally:
        saver.stdin.close()
        saver.wait(timeout=60)
        saver.stdout.close()
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
