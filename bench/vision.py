"""LoRA among its alternatives on a real vision task: MobileNetV2 (ImageNet weights) adapted to
Fashion-MNIST three ways, in one run, on the same data, steps and image size.

- linear probe: the backbone frozen, only a new 10-way head trains;
- LoRA: the backbone frozen (batch norms too), LoRA r=8 on all 52 convolutions, and the head
  (exactly what `lorakit train --config configs/mobilenetv2-fashion.yaml` does, by calling it);
- full fine-tuning: every weight trains, batch norms in training mode.
Same batches in the same order with the same augmentation (a pure function of seed and step), the
same AdamW, learning-rate schedule and clipping; the learning rate is each method's own (the head
alone and LoRA take a larger one than full fine-tuning, as is usual). Each is scored on all 10,000
test images. Reports accuracy, trainable parameters, the size of what must be stored, peak
memory above the loaded model and the median step time.

    python bench/vision.py [--steps 1500] [--batch 64] [--size 64]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import PeakMemory, write_table

LEARNING_RATES = {"linear probe": 2e-3, "LoRA": 2e-3, "full fine-tuning": 5e-4}


def run_baseline(method: str, args, test_set) -> dict:
    """The probe or full fine-tuning, with lorakit's batches, augmentation and schedule. Peak memory
    counts from before the model and the training images are loaded, as for LoRA (whose run is
    `lorakit train` itself, loading both)."""
    from lorakit.evaluation.images import evaluate_images

    with PeakMemory(torch.device("cpu")) as memory:
        model, params, times = _train_baseline(method, args)
    score = evaluate_images(model, test_set, args.size, 256, torch.device("cpu"))
    stored = sum(p.numel() * p.element_size() for p in params)  # what must be kept: the trained tensors
    return {"accuracy": score.accuracy, "trainable": sum(p.numel() for p in params), "stored": stored,
            "peak": memory.peak, "step": statistics.median(times)}


def _train_baseline(method: str, args):
    from lorakit.data.images import image_set, model_input
    from lorakit.models.mobilenet_v2 import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        image_classifier,
    )
    from lorakit.train.images import _train_mode
    from lorakit.train.run import clip_gradients, lr_factor

    torch.manual_seed(0)
    model = image_classifier("mobilenet_v2", 10)
    train_set = image_set("fashion-mnist/train")
    if method == "linear probe":
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(model.classifier.parameters())
        for p in params:
            p.requires_grad_(True)
        _train_mode(model)
    else:
        params = list(model.parameters())
        model.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATES[method], weight_decay=0.0)
    per_epoch = math.ceil(len(train_set) / args.batch)
    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(epoch))
        rows = order[position * args.batch:(position + 1) * args.batch]
        images = model_input(train_set.images[rows], args.size, IMAGENET_MEAN, IMAGENET_STD,
                             torch.Generator().manual_seed(step))
        lr = LEARNING_RATES[method] * lr_factor(step, args.steps, 20, 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(images), train_set.labels[rows])
        loss.backward()
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return model, params, times


def run_lora(args, test_set) -> dict:
    from lorakit.evaluation.images import evaluate_images, load_image_adapter
    from lorakit.train.config import from_sources
    from lorakit.train.images import train_images
    from lorakit.train.metrics import read_metrics

    output = Path(tempfile.mkdtemp(prefix="lorakit-vision-bench-"))
    config = from_sources(ROOT / "configs" / "mobilenetv2-fashion.yaml", None)
    config = type(config)(**{**config.to_dict(), "output": str(output), "max_steps": args.steps,
                             "batch_size": args.batch, "image_size": args.size, "val": None, "eval_every": 0,
                             "save_every": 0, "progress": False, "lr": LEARNING_RATES["LoRA"]})
    with PeakMemory(torch.device("cpu")) as memory:
        train_images(config)
    steps = [args.batch / r["images_per_s"] for r in read_metrics(output / "metrics.jsonl") if "images_per_s" in r]
    model, _ = load_image_adapter(output)
    score = evaluate_images(model, test_set, args.size, 256, torch.device("cpu"))
    from lorakit.files.peft_format import adapter_slots

    trainable = sum(p.numel() for p in adapter_slots(model, "default").values())
    return {"accuracy": score.accuracy, "trainable": trainable,
            "stored": (output / "adapter_model.safetensors").stat().st_size, "peak": memory.peak,
            "step": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from lorakit.data.images import image_set

    test_set = image_set("fashion-mnist/test")
    results = {}
    for method in ("linear probe", "LoRA", "full fine-tuning"):
        results[method] = run_lora(args, test_set) if method == "LoRA" else run_baseline(method, args, test_set)
        r = results[method]
        print(f"{method}: {100 * r['accuracy']:.2f}% top-1, {r['trainable']:,} trainable, "
              f"{1000 * r['step']:.0f} ms/step", flush=True)
    full = results["full fine-tuning"]
    rows = [[method, f"{100 * r['accuracy']:.2f}%", f"{r['trainable']:,} ({100 * r['trainable'] / full['trainable']:.1f}%)",
             f"{r['stored'] / 2**20:.2f} MiB", f"{r['peak'] / 2**20:.0f} MiB", f"{1000 * r['step']:.0f} ms"]
            for method, r in results.items()]
    path = write_table(
        "vision_cpu", "MobileNetV2 (ImageNet) adapted to Fashion-MNIST: linear probe, LoRA, full fine-tuning",
        f"python bench/vision.py --steps {args.steps} --batch {args.batch} --size {args.size}",
        ["method", "top-1 on the 10,000 test images", "trainable parameters (of full)", "stored",
         "peak memory (model, images and training)", "step time (median)"], rows,
        notes=f"{args.steps} steps of {args.batch} images at {args.size} px (shifted and mirrored at random), the same "
              f"batches for every method; AdamW, 20 warm-up steps then cosine to 0, gradients clipped to 1; learning "
              f"rates {LEARNING_RATES}. Stored: the adapter file for LoRA, the trained tensors (float32) for the "
              "others. LoRA: r=8, alpha 16, all 52 convolutions, plus the head.")
    print(path.read_text())


if __name__ == "__main__":
    main()
