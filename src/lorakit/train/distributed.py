"""Training on several processes with torch.distributed, as torchrun launches it.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; without them (or with one process)
training runs as a single process and nothing here does anything. The backend follows the device:
NCCL on CUDA, gloo on CPU.

Every process builds the same global batch (the data order is a pure function of seed and step)
and takes its share of its rows, so the batch the config names is the global one, whatever the
number of processes. Each process's loss is its rows' loss sum over the global batch's target
tokens; summing the adapters' gradients over processes then gives exactly the single-process
gradient. DDP averages gradients, so the loss is multiplied by the number of processes.

Two ways to share the work (the config's ``parallel``):
  ddp   every process holds the whole model; DDP all-reduces the adapters' gradients.
  fsdp  FSDP2 (``fully_shard``) shards each decoder layer's parameters, frozen base and adapter
        alike, over the processes and gathers a layer's weights only while it runs: for a base
        that does not fit one device. Embeddings, the final norm and the head stay whole (the
        head is often tied to the embedding), so adapters must live inside the decoder layers.
        Adapter weights and optimizer moments are then DTensors; ``full`` gathers them for saving
        and ``shard_like`` cuts a saved tensor back to a process's shard.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.data.batches import Batch
from lorakit.errors import ConfigError
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
    _die_with_launcher()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def _die_with_launcher() -> None:
    """torchrun starts each training process in a session of its own, so a launcher killed outright
    (SIGKILL, the out-of-memory killer: no signal to pass on) would leave them training on, orphaned,
    writing checkpoints into a run that is being resumed. On Linux they ask to be killed when their
    launcher dies (prctl PR_SET_PDEATHSIG); elsewhere they are not."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def leave(world: World, finished: bool = True) -> None:
    """Leave the process group. After a finished run every process first waits for the others
    (process 0 is still writing files when the rest are done): a process that tears its group
    down while a peer's collective work is in flight can die in gloo's threads (seen: SIGABRT,
    "terminate called without an active exception", about once in 20 two-process runs). After a
    failure nobody waits: the peers may never arrive, and torchrun stops them."""
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


LossFunction = Callable[[Batch, bool], torch.Tensor]


def loss_function(model: nn.Module, world: World, parallel: str = "ddp") -> LossFunction:
    """(this process's rows of a micro-batch, whether it is the step's last) -> loss sum, scaled so
    that the gradients' average over processes is their sum; gradients are synchronised on the
    last micro-batch only. Every process must call it for every micro-batch (the synchronisation
    is collective): the loop gives a process without rows of its own a row to weigh by zero.
    Puts ``model`` (on the CPU, its trainable parameters marked) on the world's device: whole, or
    under FSDP each process's shards alone, so a base larger than one device never lands on one."""
    if parallel == "fsdp" and world.distributed:
        return _sharded_loss(model, world)
    model.to(world.device)
    if not world.distributed:
        return lambda batch, last: loss_sum(model, batch)
    return _replicated_loss(model, world)


class _LossOfBatch(nn.Module):
    """model -> its loss sum on a batch: the forward DDP wraps, so DDP sees the call it synchronises."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.model, batch)


def _replicated_loss(model: nn.Module, world: World) -> LossFunction:
    from torch.nn.parallel import DistributedDataParallel

    # The frozen base has no gradients and takes no part; buffers (quantized codes) never change, so
    # they are not re-sent before every forward (the flag's name changed in recent PyTorch).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    engine = DistributedDataParallel(_LossOfBatch(model), **no_buffer_sync,
                                     device_ids=[world.device.index] if world.device.type == "cuda" else None)

    def loss_of(batch: Batch, last: bool) -> torch.Tensor:
        with nullcontext() if last else engine.no_sync():
            return engine(batch) * world.size

    return loss_of


def _sharded_loss(model: nn.Module, world: World) -> LossFunction:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ConfigError(f"parallel: fsdp shards the decoder layers, and adapter weights such as {outside[0]} "
                          "lie outside them; adapt modules inside the layers, or use parallel: ddp")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in reversed(layers):  # innermost first, as fully_shard requires of nested layers
        fully_shard(layer, mesh=mesh)  # moves this process's shards alone to the device
    model.to(world.device)  # the rest: embeddings, final norm, head, buffers

    def loss_of(batch: Batch, last: bool) -> torch.Tensor:
        for layer in layers:
            layer.set_requires_gradient_sync(last, recurse=False)
        # No shared-prefix pass (train/loss.py): it runs each layer twice in one forward, and FSDP
        # frees a layer's gathered weights after each run, which the first run's backward needs.
        return loss_sum(model, dataclasses.replace(batch, shared_prefix=0)) * world.size

    return loss_of


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, outermost first: the classes a transformers model names as never
    to be split across devices (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"parallel: fsdp shards a model's decoder layers, and {type(model).__name__} names none "
                          "(_no_split_modules); use parallel: ddp")
    return layers


def gathered(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor whole and detached (see ``full``)."""
    return {key: full(param.detach()) for key, param in params.items()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor that FSDP shards over processes (every process must ask, in the same
    order); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of a tensor: its shard under FSDP, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``param`` is: this process's shard of it when ``param`` is sharded."""
    if not isinstance(param, DTensor):
        return whole
    # Every process holds the same ``whole`` (read from one checkpoint), so each cuts its own shard.
    return distribute_tensor(whole.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)
