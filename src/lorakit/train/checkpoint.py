"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

    OUTPUT/checkpoints/step-000050/  what trains, in its method's files (an adapter in PEFT's format
                                     for LoRA), optimizer.safetensors, state.json
    OUTPUT/checkpoints/latest        "step-000050", replaced atomically after the directory is complete

A checkpoint directory is written under a temporary name and renamed into place; only then does
``latest`` move to it, and only then are older checkpoints removed. A crash at any point leaves
``latest`` naming a complete checkpoint. Everything is safetensors or JSON: nothing is unpickled.

What makes resume exact: the adapter weights, AdamW's moments and step counts, the RNG states
(dropout draws from them), and the step number. The data order and the learning rate are pure
functions of (seed, step), so they need no saving.

Under torchrun every process calls ``capture`` (FSDP's sharded tensors are gathered whole, a
collective step) and process 0 alone calls ``save_checkpoint``; every process calls ``restore``
and takes its own shard of what it reads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.files.atomic import (
    atomic_path,
    atomic_write_text,
    fsync_tree,
    replace_directory,
    temporary_name,
)
from lorakit.methods.method import Method
from lorakit.train.distributed import full, gathered, shard_like

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINABLE_FILE = "trainable.safetensors"  # the trained tensors, where the method's own file holds others
STATE_FILE = "state.json"


class CheckpointError(LorakitError):
    """A checkpoint is missing, incomplete, or does not fit the run being resumed."""


@dataclass
class Checkpoint:
    step: int
    config: dict  # the TrainConfig of the run, as saved
    directory: Path


@dataclass
class TrainingState:
    """What a checkpoint holds besides the settings, every tensor whole."""
    adapter: dict[str, torch.Tensor]  # file key -> weight
    optimizer: dict[str, torch.Tensor]  # "<file key>::exp_avg" (and exp_avg_sq, step), "rng::cpu", "rng::cuda<d>"


def capture(slots: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> TrainingState:
    return TrainingState(gathered(slots), _optimizer_tensors(slots, optimizer))


def save_checkpoint(output: Path, method: Method, model: nn.Module, state: TrainingState, step: int,
                    config: dict) -> Path:
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    tmp = temporary_name(final)
    try:
        method.save(model, tmp, tensors=state.adapter)
        if not method.saves_slots(model):  # the file holds something made from them (a prefix's MLP output)
            with atomic_path(tmp / TRAINABLE_FILE) as path:
                save_file(state.adapter, str(path))
        with atomic_path(tmp / OPTIMIZER_FILE) as path:
            save_file(state.optimizer, str(path))
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, "config": config}, indent=2) + "\n")
        fsync_tree(tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.iterdir():  # older checkpoints and leftovers of crashed writes
        if old.name not in (name, LATEST):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def latest_checkpoint(output: Path) -> Checkpoint | None:
    pointer = output / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    directory = output / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        return Checkpoint(int(state["step"]), state["config"], directory)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: checkpoint is unreadable ({err}); "
                              "start again without --resume") from None


def restore(checkpoint: Checkpoint, method: Method, slots: dict[str, nn.Parameter],
            optimizer: torch.optim.Optimizer) -> None:
    """Put the trained weights, optimizer state and RNG states of ``checkpoint`` back in place."""
    trainable = checkpoint.directory / TRAINABLE_FILE
    try:
        tensors = load_file(str(trainable)) if trainable.is_file() else method.read(checkpoint.directory)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{trainable}: unreadable ({err})") from None
    try:
        saved = load_file(str(checkpoint.directory / OPTIMIZER_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{checkpoint.directory}: optimizer state unreadable ({err})") from None
    if set(tensors) != set(slots):
        raise CheckpointError(f"{checkpoint.directory}: the checkpoint's adapter does not match this model's")
    with torch.no_grad():
        for key, param in slots.items():
            param.copy_(shard_like(param, tensors[key]))

    state = optimizer.state_dict()
    index = optimizer_index(optimizer, slots)
    state["state"] = {}
    for key, i in index.items():
        moments = {}
        for part in ("exp_avg", "exp_avg_sq", "step"):  # the moments are laid out as their parameter is
            if f"{key}::{part}" in saved:
                value = saved[f"{key}::{part}"]
                moments[part] = value if part == "step" else shard_like(slots[key], value)
        if moments:
            state["state"][i] = moments
    optimizer.load_state_dict(state)

    torch.set_rng_state(saved["rng::cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([saved[f"rng::cuda{d}"] for d in range(torch.cuda.device_count())
                                      if f"rng::cuda{d}" in saved])


def optimizer_index(optimizer: torch.optim.Optimizer, slots: dict[str, nn.Parameter]) -> dict[str, int]:
    """File key -> the parameter's index in ``optimizer.state_dict()`` (its place across the param groups)."""
    key_of = {id(param): key for key, param in slots.items()}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {key_of[id(param)]: i for i, param in enumerate(params)}


def _optimizer_tensors(slots: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, param in slots.items():
        for part, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}::{part}"] = full(value.detach()).to("cpu", copy=True).contiguous()
    tensors["rng::cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng::cuda{d}"] = rng
    return tensors
