"""LoRA training-step overhead, lorakit vs PEFT, on a SmolLM2-135M-shaped Llama (random weights).

Each measurement is one child process (so peak memory is that library's alone), and the two
libraries alternate in one run so that machine noise hits both alike. A step is forward with
labels, backward, AdamW step, zero_grad; same model, data, seed and LoRA settings (r=16,
alpha=32, dropout 0.05, all linear layers). Reports the median step time and the peak memory
in use above the loaded model (activations, gradients, optimizer state), as lorakit / PEFT
ratios; writes bench/results/lora_overhead.md.

    python bench/lora_overhead.py [--trials 3] [--steps 3] [--batch 2] [--seq 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PeakMemory,
    alternate_workers,
    smollm2_shaped_llama,
    write_table,
)

LIBRARIES = ("lorakit", "peft")


def inject(library: str, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    if library == "lorakit":
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
        return list(lorakit.lora_parameters(model))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    return [p for p in model.parameters() if p.requires_grad]


def worker(library: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = smollm2_shaped_llama().to(device)
    params = inject(library, model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    with PeakMemory(device) as memory:
        step()  # warm-up, untimed: the first step also creates AdamW's state
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"times": times, "peak": memory.peak, "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="child processes per library, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child, after one warm-up step")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    results = alternate_workers(__file__, LIBRARIES, args.trials, ["--steps", str(args.steps), "--batch",
                                str(args.batch), "--seq", str(args.seq), "--device", args.device])

    summary = {}
    for lib, runs in results.items():
        summary[lib] = {
            "step": statistics.median(t for r in runs for t in r["times"]),
            "peak": statistics.median(r["peak"] for r in runs),
            "trainable": runs[0]["trainable"],
        }
    ours, theirs = summary["lorakit"], summary["peft"]
    assert ours["trainable"] == theirs["trainable"], "the two libraries must train the same parameters"
    rows = [[lib, f"{s['step'] * 1000:.0f} ms", f"{s['peak'] / 2**20:.0f} MiB", f"{s['trainable']:,}"]
            for lib, s in summary.items()]
    rows.append(["**lorakit / PEFT**", f"**{ours['step'] / theirs['step']:.3f}x**",
                 f"**{ours['peak'] / theirs['peak']:.3f}x**", ""])
    command = f"python bench/lora_overhead.py --trials {args.trials} --steps {args.steps} --batch {args.batch} --seq {args.seq} --device {args.device}"
    path = write_table(
        "lora_overhead", "LoRA training step: lorakit vs PEFT (SmolLM2-135M shape, random weights)", command,
        ["library", "median step", "peak memory above model", "trainable params"], rows,
        notes=f"r=16, alpha=32, dropout 0.05, all linear layers; batch {args.batch} x {args.seq} tokens; "
              f"forward + backward + AdamW step; {args.trials} alternating child processes x {args.steps} steps each.",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
