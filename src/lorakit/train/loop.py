"""The training loop: read top to bottom, it is the whole of `lorakit train`.

Loss normalisation: each optimizer step minimises the mean cross-entropy over every target token
of its ``grad_accum`` batches (each micro-batch's loss sum is divided by the step's total token
count), so accumulation gives the gradient a single large batch would, whatever the batches'
lengths. Under torchrun each process takes a share of every batch's rows (train/distributed.py);
the sum of their gradients is the same gradient, and process 0 alone writes files and the bar.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.core.layers.dropout import assign_layer_keys, row_key, set_row_keys
from lorakit.data.batches import Batch, collate, epoch_batches
from lorakit.data.tokenize import padding_id, tokenize_file
from lorakit.errors import ConfigError
from lorakit.files.decoding import write_copy_fields
from lorakit.methods.method import method_named
from lorakit.models.autocast_weights import frozen_weights_in
from lorakit.models.base import load_base
from lorakit.train import distributed
from lorakit.train.checkpoint import (
    capture,
    restore,
    save_checkpoint,
)
from lorakit.train.config import TrainConfig
from lorakit.train.loss import evaluate_loss
from lorakit.train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_losses
from lorakit.train.optimizer import make_optimizer, set_learning_rate
from lorakit.train.precision import compute_context, resolved_compute_dtype
from lorakit.train.run import (
    TrainResult,
    apply_step,
    checkpoint_to_resume,
    clip_gradients,
    lr_factor,
    progress_bar,
    refuse_to_clobber,
)


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Fine-tune ``config.base`` on ``config.train`` and write the adapter to ``config.output``.
    ``stop_after`` ends the run after that many optimizer steps in total (a checkpoint is left to
    resume from), without changing the schedule."""
    if config.task == "image-classification":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("task: image-classification trains on one process; leave out --nproc")
        from lorakit.train.images import train_images

        return train_images(config, resume, overwrite, stop_after)
    world = distributed.join()
    finished = False
    try:
        result = _train(config, world, resume, overwrite, stop_after)
        finished = True
        return result
    finally:
        distributed.leave(world, finished)


def _train(config: TrainConfig, world: distributed.World, resume: bool, overwrite: bool,
           stop_after: int | None) -> TrainResult:
    output = Path(config.output)
    checkpoint = checkpoint_to_resume(output, config) if resume else None
    if checkpoint is None and (world.is_main or not overwrite):  # process 0 alone clears a run it replaces
        refuse_to_clobber(output, overwrite)
    if config.batch_size < world.size:
        raise ConfigError(f"batch_size={config.batch_size} is the global batch, shared by {world.size} processes; "
                          f"make it at least {world.size}")
    if config.threads:
        torch.set_num_threads(config.threads)
    if not world.is_main:  # one progress bar: process 0's
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    device = world.device

    model, tokenizer = load_base(config.base, getattr(torch, config.dtype), config.quant_spec())
    pad_id = padding_id(tokenizer)
    copy_fields = frozenset(config.copy_fields)
    train_set = tokenize_file(config.train, tokenizer, config.max_length, copy_fields)
    val_set = tokenize_file(config.val, tokenizer, config.max_length, copy_fields) if config.val else []

    method = method_named(config.method, config.lora)
    model = method.attach(model, config.method_settings())
    dropouts = assign_layer_keys(model)  # named before any wrapping, so every process names them alike
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    loss_of = distributed.loss_function(model, world, config.parallel)  # moves (or shards) the model to the device
    slots = method.slots(model)  # file key -> Parameter: what trains, is saved and checkpointed
    optimizer = make_optimizer(slots, config.learning_rate, config.weight_decay, config.loraplus_lr_ratio)

    lengths = [len(e) for e in train_set]
    per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * per_epoch / config.grad_accum)
    start = 0
    if checkpoint is not None:
        restore(checkpoint, method, slots, optimizer)
        start = checkpoint.step
    if world.is_main:
        output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output, resume_step=start if checkpoint else None) if world.is_main else None
    end = min(total_steps, stop_after) if stop_after is not None else total_steps
    last_saved = start if checkpoint is not None else None  # the step of the newest checkpoint

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch: int) -> list[list[int]]:
        return epoch_batches(lengths, config.batch_size, config.seed, epoch)

    def batch_at(index: int) -> tuple[int, Batch, float, torch.Tensor]:
        """(target tokens of the index-th micro-batch of the run, this process's share of its rows,
        the weight of their loss, their dropout keys): a pure function of (seed, index). A process
        left without rows (a short last batch) runs the first row with weight 0, so that it still
        takes part. A row's dropout key follows from its place in the global batch, so its masks
        are the same on any number of processes."""
        epoch, position = divmod(index, per_epoch)
        rows = epoch_order(epoch)[position]
        places = world.rows(list(range(len(rows))))
        mine = [rows[i] for i in places]
        target_tokens = collate([train_set[i] for i in rows], pad_id).loss_tokens
        keys = torch.tensor([row_key(config.seed, index, i) for i in places or [0]], dtype=torch.int64, device=device)
        return (target_tokens, collate([train_set[i] for i in mine or rows[:1]], pad_id).to(device),
                float(bool(mine)), keys)

    if config.progress and world.is_main:
        print(_summary(model, len(train_set), total_steps, config, device, world.size), file=sys.stderr)
    bar = progress_bar(config, total_steps, start) if world.is_main else None
    compute = compute_context(config.compute_dtype, device, recomputes=config.gradient_checkpointing)
    losses: list[float] = []
    val_loss = None
    model.train()
    # Frozen base weights held in the compute dtype for the run: the same products, without autocast
    # casting every one of them again in every forward (models/autocast_weights.py). Under FSDP the
    # parameters are shards that FSDP gathers from storage of its own, so its runs keep them as loaded.
    sharded = config.parallel == "fsdp" and world.distributed
    held_dtype = None if sharded else getattr(torch, resolved_compute_dtype(config.compute_dtype, device))
    with frozen_weights_in(model, held_dtype):
        for step in range(start, end):
            started = time.perf_counter()
            lr = config.learning_rate * lr_factor(step, total_steps, config.warmup_steps, config.min_lr_ratio)
            set_learning_rate(optimizer, lr)
            micro = [batch_at(step * config.grad_accum + k) for k in range(config.grad_accum)]
            target_tokens = sum(tokens for tokens, _, _, _ in micro)
            step_loss = 0.0
            for k, (_, batch, weight, keys) in enumerate(micro):
                set_row_keys(dropouts, keys)  # kept through backward: checkpointed layers recompute their masks
                with compute(batch.input_ids.shape[1]):
                    loss = loss_of(batch, k == config.grad_accum - 1) * weight / max(target_tokens, 1)
                loss.backward()
                step_loss += loss.item() / world.size  # loss_of scales by the number of processes
            set_row_keys(dropouts, None)
            mine = sum(int(b.attention_mask.sum()) * weight for _, b, weight, _ in micro)
            step_loss, tokens = world.sum(step_loss, mine)
            grad_norm = clip_gradients(slots.values(), config.max_grad_norm)
            done = step + 1
            apply_step(optimizer, done, step_loss, grad_norm, last_saved,
                       "a lower --lr or --max-grad-norm, check the data, or use a float32 base")

            seconds = time.perf_counter() - started
            tokens = int(tokens)
            losses.append(step_loss)
            if world.is_main:
                metrics.write({"step": done, "epoch": round(done * config.grad_accum / per_epoch, 4), "loss": step_loss,
                               "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "target_tokens": target_tokens,
                               "tokens_per_s": round(tokens / seconds, 1)})
            # Every process validates and captures checkpoints (under FSDP each layer's weights are gathered
            # from all of them); process 0 alone writes.
            if val_set and (done == total_steps or (config.eval_every and done % config.eval_every == 0)):
                with compute():
                    val_loss = evaluate_loss(model, val_set, config.batch_size, pad_id, device)
                if world.is_main:
                    metrics.write({"step": done, "val_loss": val_loss})
            if done == end or (config.save_every and done % config.save_every == 0):
                state = capture(slots, optimizer)
                if world.is_main:
                    metrics.sync()  # the metrics a resume from this checkpoint keeps are on disk first
                    save_checkpoint(output, method, model, state, done, config.to_dict())
                last_saved = done
            if bar is not None:
                bar.set_postfix_str(_postfix(losses, val_loss, tokens / seconds), refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()

    adapter = distributed.gathered(slots) if end == total_steps else None
    if world.is_main:
        if adapter is not None:
            method.save(model, output, tensors=adapter, tokenizer=tokenizer)
            write_copy_fields(output, config.copy_fields)  # so that eval and generate copy them too
        plot_losses(output / METRICS_FILE, output / PLOT_FILE)
    return TrainResult(output, end, total_steps, losses, val_loss)


def _enable_activation_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing: the frozen base's inputs need no requires_grad for it to work.
    # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it")


def _postfix(losses: list[float], val_loss: float | None, tokens_per_s: float) -> str:
    recent = losses[-10:]
    text = f"loss {sum(recent) / len(recent):.4f}"
    if val_loss is not None:
        text += f", val {val_loss:.4f}"
    return text + f", {tokens_per_s:,.0f} tok/s"


def _summary(model: nn.Module, examples: int, total_steps: int, config: TrainConfig, device: torch.device,
             processes: int) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in model.parameters())
    what = "parameters" if config.method == "full" else f"{config.method} parameters"
    text = (f"lorakit: training {trainable / 1e6:.2f}M {what} ({100 * trainable / everything:.2f}% "
            f"of {everything / 1e6:.0f}M) on {examples} examples for {total_steps} steps of "
            f"{config.batch_size}x{config.grad_accum} on {device}")
    products = resolved_compute_dtype(config.compute_dtype, device)
    if products != "float32":  # what "auto" chose, said once
        text += f" with {products} products"
    if processes > 1:
        tensors = [*model.parameters(), *model.buffers()]
        held = sum(distributed.local(t).nbytes for t in tensors) / 2**20
        whole = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        text += (f", shared by {processes} processes ({config.parallel}: each holds {held:,.0f} MiB of the "
                 f"model's {whole:,.0f} MiB)")
    return text
