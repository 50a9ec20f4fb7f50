"""What every training run shares, whatever it learns: the schedule, clipping, the checks that a
run can start or resume, the progress bar, and the errors that stop it."""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import distributed
from lorakit.train.checkpoint import CHECKPOINTS, CheckpointError, latest_checkpoint
from lorakit.train.config import RESUMABLE_CHANGES, TrainConfig
from lorakit.train.metrics import METRICS_FILE


@dataclass
class TrainResult:
    output: Path
    steps: int  # optimizer steps done in all, counting those before a resume
    total_steps: int
    losses: list[float]  # training loss of each step taken in this call
    val_loss: float | None


class TrainingDiverged(LorakitError):
    """The loss or the gradients became NaN or infinite; nothing of that step was applied or saved."""


def last_good(step: int | None) -> str:
    return "no checkpoint was written yet" if step is None else f"the last checkpoint, step {step}, is as it was"


def apply_step(optimizer: torch.optim.Optimizer, done: int, step_loss: float, grad_norm: float,
               last_saved: int | None, advice: str) -> None:
    """Step ``optimizer`` and clear the gradients, unless the loss or the gradient norm is NaN or
    infinite: then TrainingDiverged (the same verdict on every process), nothing applied, and
    ``advice`` (what to change) at the end of its message."""
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"step {done}: the loss is {step_loss:g} and the gradient norm {grad_norm:g}, so "
                               f"training stopped before applying it ({last_good(last_saved)}); start again "
                               f"with {advice}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(total - warmup - 1, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def clip_gradients(params, max_norm: float) -> float:
    """The gradients' global norm, before they are clipped to ``max_norm`` (0: not clipped)."""
    params = [p for p in params if p.grad is not None]
    norm = distributed.full(torch.nn.utils.get_total_norm([p.grad for p in params]))  # whole under FSDP too
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def checkpoint_to_resume(output: Path, config: TrainConfig):
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        raise CheckpointError(f"{output}: no checkpoint to resume from; run without --resume to start")
    saved = TrainConfig(**checkpoint.config)
    changed = [name for name in config.changed_fields(saved) if name not in RESUMABLE_CHANGES]
    if changed:
        details = ", ".join(f"{n} (checkpoint {getattr(saved, n)!r}, now {getattr(config, n)!r})" for n in changed)
        raise ConfigError(f"cannot resume with changed settings: {details}; resume with the original "
                          "settings or start a new run in another --output")
    return checkpoint


def refuse_to_clobber(output: Path, overwrite: bool) -> None:
    if overwrite:  # a stale checkpoint must not be resumed later as if it were this run's
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        return
    previous = [p.name for p in (output / METRICS_FILE, output / CHECKPOINTS, output / "adapter_model.safetensors",
                                 output / "model.safetensors")
                if p.exists()]
    if previous:
        raise ConfigError(f"{output} already holds a run ({', '.join(previous)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output")


def progress_bar(config: TrainConfig, total: int, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


