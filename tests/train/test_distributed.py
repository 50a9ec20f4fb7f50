"""Training under torchrun: 2 gloo processes on CPU give the single-process run's losses and adapter,
and a 2-process run killed mid-way resumes with the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.data import orders
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_base_dir):
    directory = tmp_path_factory.mktemp("ddp")
    orders.write_splits(directory, {"train": 16, "val": 4})
    path = directory / "recipe.yaml"
    # A global batch of 4 rows (2 per process), accumulated twice: 8 examples a step.
    path.write_text(f"base: {tiny_base_dir}\ntrain: {directory / 'train.jsonl'}\nval: {directory / 'val.jsonl'}\n"
                    "r: 4\nmax_steps: 4\nbatch_size: 4\ngrad_accum: 2\nlr: 1e-2\nwarmup_steps: 1\nsave_every: 1\n"
                    "threads: 1\n", encoding="utf-8")
    return path


def _torchrun(recipe, output, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(recipe), "--output", str(output),
               "--no-progress", "--nproc", "2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _losses(output) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["val_loss"] for r in records]


def test_two_processes_train_as_one(recipe, tmp_path):
    from lorakit.train.config import from_sources

    config = from_sources(recipe, None)
    train(TrainConfig(**{**config.to_dict(), "output": str(tmp_path / "one"), "progress": False}))
    run = _torchrun(recipe, tmp_path / "two")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert out.count("adapter written to") == 1  # process 0 alone reports
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-5)
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)


def test_a_killed_two_process_run_resumes_with_the_same_losses(recipe, tmp_path):
    whole = _torchrun(recipe, tmp_path / "whole", "--max-steps", "10")
    assert whole.wait(timeout=300) == 0
    killed = _torchrun(recipe, tmp_path / "killed", "--max-steps", "10")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-000002"):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    killed.wait()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()  # it did not get to the end
    resume = [sys.executable, "-m", "lorakit", "train", "--resume", "--output", str(tmp_path / "killed"),
              "--no-progress", "--nproc", "2"]
    resumed = subprocess.run(resume, check=False, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)


def test_a_global_batch_smaller_than_the_processes_is_refused(recipe, tmp_path):
    run = _torchrun(recipe, tmp_path / "small", "--batch-size", "1")
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "[rank 0] error: batch_size=1 is the global batch, shared by 2 processes" in err
