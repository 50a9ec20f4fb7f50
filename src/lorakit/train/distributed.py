"""Training on several processes with torch.distributed, as torchrun launches it.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; without them (or with one process)
training runs as a single process and nothing here does anything. The backend follows the device:
NCCL on CUDA, gloo on CPU.

Every process builds the same global batch (the data order is a pure function of seed and step)
and takes its share of its rows, so the batch the config names is the global one, whatever the
number of processes. Each process's loss is its rows' loss sum over the global batch's target
tokens; summing the adapters' gradients over processes then gives exactly the single-process
gradient. DDP averages gradients, so the loss is multiplied by the number of processes.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.data.batches import Batch
from lorakit.train.loss import loss_sum


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, rows: list[int]) -> list[int]:
        """This process's share of a global batch's rows: every size-th, from its rank."""
        return rows[self.rank::self.size]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes (the values themselves on one process)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


def join() -> World:
    """The process group torchrun describes in the environment, joined (once); or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if size == 1:
        return World(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _LossOfBatch(nn.Module):
    """model -> its loss sum on a batch: the forward DDP wraps, so DDP sees the call it synchronises.
    A process without rows in a batch (a short last batch) contributes a zero loss that still
    touches every adapter parameter, so the gradient all-reduce finds each one ready."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch | None) -> torch.Tensor:
        if batch is None:
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return loss_sum(self.model, batch)


def loss_function(model: nn.Module, world: World):
    """(batch or None, last micro-batch of the step) -> loss sum, scaled so that DDP's gradient
    average is the sum over processes; gradients are synchronised on the last micro-batch only."""
    if not world.distributed:
        return lambda batch, last: loss_sum(model, batch)
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    # The frozen base has no gradients and takes no part; buffers (quantized codes) never change, so
    # they are not re-sent before every forward (the flag's name changed in recent PyTorch).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    engine = DistributedDataParallel(_LossOfBatch(model), **no_buffer_sync,
                                     device_ids=[world.device.index] if world.device.type == "cuda" else None)

    def loss_of(batch: Batch | None, last: bool) -> torch.Tensor:
        with nullcontext() if last else engine.no_sync():
            return engine(batch) * world.size

    return loss_of
