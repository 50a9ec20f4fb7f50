"""Training under torchrun: 2 gloo processes on CPU give the single-process run's losses and adapter,
whether they replicate the model (DDP) or shard its layers (FSDP), and a 2-process run killed mid-way
resumes with the same losses under either."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from tests.conftest import write_orders_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_base_dir):
    # A global batch of 4 rows (2 per process), accumulated twice: 8 examples a step; dropout on, whose
    # masks follow each row's place in the global batch, not the process that draws them.
    return write_orders_recipe(tmp_path_factory.mktemp("ddp"), tiny_base_dir, "recipe.yaml", grad_accum=2,
                               save_every=1, threads=1, dropout=0.1)


def _torchrun(recipe, output, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(recipe), "--output", str(output),
               "--no-progress", "--nproc", "2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _losses(output) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["val_loss"] for r in records]


@pytest.fixture(scope="module")
def ddp_run(recipe, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "ddp"
    run = _torchrun(recipe, output)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert out.count("adapter written to") == 1  # process 0 alone reports
    return output


# 1 process, DDP and FSDP do the same arithmetic in a different float32 summation order: rows'
# gradient contributions are summed per process and then across processes, and the gradient norm
# adds partial sums per shard (without dropout, the shared-prefix pass also runs on each process's
# rows, and not at all under FSDP). Dropout masks are the same in every layout (keyed by row). Each
# rounding moves a result by at most 2**-24 (6e-8) of its size; the run's four AdamW steps carry some
# tens of them into the adapter. So losses are compared relative to their size, at 1e-5 (~170
# roundings): a bound on summation order that does not depend on the CPU's kernels, where an
# absolute bound on the logits did. Adapter tensors get 1e-4: AdamW divides each gradient component
# by its own running magnitude, so a component whose gradient is at rounding level takes a step as
# large as any other, its sign set by summation order (measured: 1e-6 of a tensor's norm on the first
# orders data, 2.1e-5 on the second). A layout that loses rows or skips a gradient sync moves the
# losses themselves far beyond 1e-5.
LAYOUT_TOLERANCE = 1e-5
ADAPTER_TOLERANCE = 1e-4


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _assert_same_run(run, reference) -> float:
    """Asserts the two runs agree up to summation order; returns their adapters' greatest relative
    difference (a tensor's difference norm over its norm)."""
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)),
                               rtol=LAYOUT_TOLERANCE, atol=0)
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (run, reference))
    assert got.keys() == want.keys()
    spread = 0.0
    for key in want:
        assert got[key].shape == want[key].shape, key  # whole tensors, not shards
        spread = max(spread, _relative_difference(got[key], want[key]))
    assert spread <= ADAPTER_TOLERANCE
    return spread


def test_two_processes_train_as_one(recipe, ddp_run, tmp_path):
    from lorakit.train.config import from_sources

    config = from_sources(recipe, None)
    train(TrainConfig(**{**config.to_dict(), "output": str(tmp_path / "one"), "progress": False}))
    _assert_same_run(ddp_run, tmp_path / "one")


def test_a_sharded_run_saves_a_whole_adapter_that_acts_as_the_replicated_ones(recipe, ddp_run, tiny_base_dir,
                                                                               tmp_path):
    from lorakit import load_adapter
    from lorakit.models.base import load_base

    run = _torchrun(recipe, tmp_path / "fsdp", "--parallel", "fsdp")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    spread = _assert_same_run(tmp_path / "fsdp", ddp_run)

    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model, _ = load_base(str(tiny_base_dir), torch.float32, None)
    bare = model.eval()(input_ids=tokens).logits
    logits = {}
    for name, directory in (("ddp", ddp_run), ("fsdp", tmp_path / "fsdp")):  # each in this one process
        model, _ = load_base(str(tiny_base_dir), torch.float32, None)
        logits[name] = load_adapter(model, directory).eval()(input_ids=tokens).logits  # no dropout
    effect = (logits["ddp"] - bare).norm()
    assert effect > 1e-3 * bare.norm()  # the adapter is in effect
    # Adapters that differ by a fraction `spread` of their size move the logits the adapter adds by
    # about that fraction (measured: 1.0 to 1.4 times it); a shard, a stale or a misplaced tensor would
    # move them by a large part of the adapter's effect.
    assert (logits["fsdp"] - logits["ddp"]).norm() <= 10 * spread * effect + 1e-7 * effect


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_two_process_run_resumes_with_the_same_losses(recipe, tmp_path, parallel):
    # Killed once its second checkpoint is written (checked every 10 ms), with 10 of 12 steps to go:
    # about a second of training left even under DDP, whose steps took ~0.1 s on a 2-core CI machine.
    whole = _torchrun(recipe, tmp_path / "whole", "--max-steps", "12", "--parallel", parallel)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    killed = _torchrun(recipe, tmp_path / "killed", "--max-steps", "12", "--parallel", parallel)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-000002"):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.01)
    workers = [_worker_of_rank(killed.pid, rank) for rank in (0, 1)]
    for pid in (killed.pid, *workers):  # the launcher and both training processes, mid-run: a power cut
        os.kill(pid, signal.SIGKILL)
    killed.communicate()  # reaps it and closes its pipes
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()  # it did not get to the end
    resume = [sys.executable, "-m", "lorakit", "train", "--resume", "--output", str(tmp_path / "killed"),
              "--no-progress", "--nproc", "2"]
    resumed = subprocess.run(resume, check=False, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)
    assert json.loads((tmp_path / "killed" / "checkpoints" / "step-000012" / "state.json").read_text())[
        "config"]["parallel"] == parallel  # resumed as it was run


def test_a_sharded_runs_checkpoint_resumes_on_one_process(recipe, ddp_run, tmp_path):
    from lorakit.train.checkpoint import latest_checkpoint

    run = _torchrun(recipe, tmp_path / "fsdp", "--parallel", "fsdp", "--stop-after", "2")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    saved = latest_checkpoint(tmp_path / "fsdp")
    assert saved.step == 2
    train(TrainConfig(**{**saved.config, "progress": False}), resume=True)  # whole tensors, so any layout resumes
    _assert_same_run(tmp_path / "fsdp", ddp_run)


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the training process of ``rank`` among the launcher's children (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through Linux's /proc")
def test_a_process_that_dies_stops_the_run_instead_of_hanging_it(recipe, tmp_path):
    run = _torchrun(recipe, tmp_path / "dies", "--max-steps", "1000", "--parallel", "fsdp")
    latest = tmp_path / "dies" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file():  # both processes are training
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(_worker_of_rank(run.pid, 1), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, err = run.communicate(timeout=120)  # process 0, waiting on process 1 in a collective, is stopped too
    assert run.returncode != 0
    # Process 0 may print the broken collective's own error first; the run's last word names the cause.
    assert err.strip().splitlines()[-1] == "error: training process 1 was killed by SIGKILL (out of memory?)"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux's /proc")
def test_training_processes_die_with_their_launcher(recipe, tmp_path):
    run = _torchrun(recipe, tmp_path / "orphans", "--max-steps", "1000")
    latest = tmp_path / "orphans" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    workers = [_worker_of_rank(run.pid, rank) for rank in (0, 1)]
    run.kill()  # the launcher alone, which cannot pass SIGKILL on
    run.wait()
    run.stdout.close()  # not read: the workers hold these pipes for as long as they live
    run.stderr.close()
    deadline = time.monotonic() + 5  # at once: orphans would train on until their store connection times out
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "training processes outlived their launcher"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_fsdp_refuses_adapters_outside_the_decoder_layers(recipe, tmp_path):
    run = _torchrun(recipe, tmp_path / "head", "--parallel", "fsdp", "--target-modules", "q_proj", "lm_head")
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "[rank 0] error: parallel: fsdp shards the decoder layers, and adapter weights such as lm_head." in err


def test_a_global_batch_smaller_than_the_processes_is_refused(recipe, tmp_path):
    run = _torchrun(recipe, tmp_path / "small", "--batch-size", "1")
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "[rank 0] error: batch_size=1 is the global batch, shared by 2 processes" in err
