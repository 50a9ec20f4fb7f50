"""Image classification: adapt an ImageNet-pretrained MobileNetV2 to labelled images, read top to
bottom like the language-model loop (train/loop.py) and sharing its run bookkeeping (train/run.py).

The backbone is frozen, batch-norm statistics included (its layers run in eval mode, so training
never moves them); LoRA adapts the convolutions the recipe names (``all-conv``: all 52, the 17
depthwise ones too) and a new classification head trains whole (``modules_to_save``). The data
order is a pure function of (seed, epoch) and a step's augmentation of (seed, step), so a resumed
run sees the images an uninterrupted one would have. One process: images fit one device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.inject import inject
from lorakit.data.images import image_set, model_input
from lorakit.evaluation.images import TASK_FILE, evaluate_images
from lorakit.files.atomic import atomic_write_text
from lorakit.methods.lora import ADAPTER_NAME, LoraMethod
from lorakit.models.mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    conv_names,
    image_classifier,
)
from lorakit.train.checkpoint import capture, restore, save_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_losses
from lorakit.train.optimizer import make_optimizer, set_learning_rate
from lorakit.train.run import (
    TrainResult,
    apply_step,
    checkpoint_to_resume,
    clip_gradients,
    lr_factor,
    progress_bar,
    refuse_to_clobber,
)

HEAD = "classifier"


def train_images(config: TrainConfig, resume: bool = False, overwrite: bool = False,
                 stop_after: int | None = None) -> TrainResult:
    output = Path(config.output)
    checkpoint = checkpoint_to_resume(output, config) if resume else None
    if checkpoint is None:
        refuse_to_clobber(output, overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_set = image_set(config.train)
    val_set = image_set(config.val) if config.val else None
    model = image_classifier(config.base, len(train_set.classes))
    targets = conv_names(model) if config.target_modules == ["all-conv"] else config.lora_targets()
    lora = config.lora.replace(target_modules=targets, modules_to_save=(HEAD,), base_model_name_or_path=config.base,
                               task_type=None)
    model = inject(model, lora, name=ADAPTER_NAME).to(device)
    method = LoraMethod(lora)  # how the adapter is named, checkpointed and saved, as in the language-model loop
    slots = method.slots(model)
    optimizer = make_optimizer(slots, config.learning_rate, config.weight_decay, config.loraplus_lr_ratio)

    per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * per_epoch / config.grad_accum)
    start = 0
    if checkpoint is not None:
        restore(checkpoint, method, slots, optimizer)
        start = checkpoint.step
    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output, resume_step=start if checkpoint else None)
    end = min(total_steps, stop_after) if stop_after is not None else total_steps
    last_saved = start if checkpoint is not None else None

    def batch_at(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th batch of the run: images (B, 3, S, S) and labels (B,), a pure function of (seed, index)."""
        epoch, position = divmod(index, per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        rows = order[position * config.batch_size:(position + 1) * config.batch_size]
        augment = torch.Generator().manual_seed(config.seed * 1_000_003 + index) if config.augment else None
        images = model_input(train_set.images[rows], config.image_size, IMAGENET_MEAN, IMAGENET_STD, augment)
        return images.to(device), train_set.labels[rows].to(device)

    if config.progress:
        trainable = sum(p.numel() for p in slots.values())
        print(f"lorakit: training {trainable / 1e6:.2f}M parameters (LoRA on {len(targets)} layers, and the head) "
              f"of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M on {len(train_set):,} images "
              f"({config.train}) at {config.image_size} px for {total_steps} steps of {config.batch_size} on {device}",
              file=sys.stderr)
    bar = progress_bar(config, total_steps, start)
    losses: list[float] = []
    val = None
    _train_mode(model)
    for step in range(start, end):
        started = time.perf_counter()
        lr = config.learning_rate * lr_factor(step, total_steps, config.warmup_steps, config.min_lr_ratio)
        set_learning_rate(optimizer, lr)
        step_loss, correct, seen = 0.0, 0, 0
        for k in range(config.grad_accum):
            images, labels = batch_at(step * config.grad_accum + k)
            logits = model(images)  # (B, classes)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum") / (config.batch_size * config.grad_accum)
            loss.backward()
            step_loss += loss.item()
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
        grad_norm = clip_gradients(slots.values(), config.max_grad_norm)
        done = step + 1
        apply_step(optimizer, done, step_loss, grad_norm, last_saved, "a lower --lr or --max-grad-norm")
        seconds = time.perf_counter() - started
        losses.append(step_loss)
        metrics.write({"step": done, "epoch": round(done * config.grad_accum / per_epoch, 4), "loss": step_loss,
                       "accuracy": correct / seen, "lr": lr, "grad_norm": grad_norm,
                       "images_per_s": round(seen / seconds, 1)})
        if val_set is not None and (done == total_steps or (config.eval_every and done % config.eval_every == 0)):
            val = evaluate_images(model, val_set, config.image_size, config.batch_size * 4, device)
            metrics.write({"step": done, "val_loss": val.loss, "val_accuracy": val.accuracy})
            _train_mode(model)
        if done == end or (config.save_every and done % config.save_every == 0):
            metrics.sync()
            save_checkpoint(output, method, model, capture(slots, optimizer), done, config.to_dict())
            last_saved = done
        if bar is not None:
            recent = losses[-10:]
            bar.set_postfix_str(f"loss {sum(recent) / len(recent):.4f}, acc {correct / seen:.3f}"
                                + (f", val acc {val.accuracy:.4f}" if val else "")
                                + f", {seen / seconds:,.0f} img/s", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    if end == total_steps:
        method.save(model, output)
        atomic_write_text(output / TASK_FILE, json.dumps(
            {"task": "image-classification", "base": config.base, "classes": list(train_set.classes),
             "image_size": config.image_size, "trained_on": config.train}, indent=2) + "\n")
    plot_losses(output / METRICS_FILE, output / PLOT_FILE)
    return TrainResult(output, end, total_steps, losses, val.loss if val else None)


def _train_mode(model: nn.Module) -> None:
    """Training mode for the adapters and the head's dropout; the frozen backbone's batch norms stay
    in eval mode, so their statistics are the pretrained ones and never move."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
