"""Does bfloat16 pay on this CPU? The question `compute_dtype: auto` answers, measured.

Two measurements, float32 against bfloat16, on this machine in one run:
- a square matrix product (--size, default 1024) alone, in GFLOP/s;
- lorakit's fine-tuning step on the real SmolLM2 (bench/train_step.py's lorakit worker: same
  batches, r=16 on all linear layers, AdamW), bfloat16 under autocast as `lorakit train` runs it;
  child processes alternate between the dtypes so machine noise hits both alike.
It also prints what `auto` picks here and the CPU flags it reads. bfloat16 is fast only where the
CPU multiplies it in hardware (AVX512-BF16 or AMX on x86); elsewhere PyTorch emulates it, and it
is slower than float32. Writes bench/results/bf16_cpu.md.

    python bench/bf16_cpu.py [--trials 2] [--steps 3] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import cpuinfo, write_table

DTYPES = ("float32", "bfloat16")


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 20) -> float:
    """Best of ``repeats`` products of two size x size matrices, in GFLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_flags() -> str:
    """The x86 flags that decide bfloat16's speed, as the kernel reports them (empty elsewhere)."""
    flags = (cpuinfo("flags") or "").split()
    if not flags:
        return ""
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in wanted)


def train_step(dtype: str, steps: int) -> float:
    """Median step time of lorakit's step in a child process (bench/train_step.py's worker)."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--worker", "lorakit", "--device", "cpu",
           "--steps", str(steps), "--compute-dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return statistics.median(json.loads(out.strip().splitlines()[-1])["times"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="child processes per dtype, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per child, after a warm-up step")
    parser.add_argument("--size", type=int, default=1024, help="side of the square matrices multiplied")
    args = parser.parse_args()
    from lorakit.train.precision import resolved_compute_dtype

    gflops = {name: matmul_gflops(getattr(torch, name), args.size) for name in DTYPES}
    steps: dict[str, list[float]] = {name: [] for name in DTYPES}
    for trial in range(args.trials):
        for name in DTYPES if trial % 2 == 0 else DTYPES[::-1]:
            steps[name].append(train_step(name, args.steps))
            print(f"trial {trial + 1}/{args.trials} {name:8s} step {steps[name][-1]:.2f} s", flush=True)
    step = {name: statistics.median(times) for name, times in steps.items()}
    rows = [[name, f"{gflops[name]:.0f}", f"{step[name]:.2f} s"] for name in DTYPES]
    rows.append(["**bfloat16 / float32**", f"**{gflops['bfloat16'] / gflops['float32']:.2f}x**",
                 f"**{step['bfloat16'] / step['float32']:.2f}x** (time)"])
    auto = resolved_compute_dtype("auto", torch.device("cpu"))
    path = write_table(
        "bf16_cpu", "bfloat16 against float32 on this CPU",
        f"python bench/bf16_cpu.py --trials {args.trials} --steps {args.steps} --size {args.size}",
        ["dtype", f"{args.size}-cube matmul GFLOP/s", "lorakit training step (median)"], rows,
        notes=f"CPU flags: {cpu_flags() or 'not an x86 Linux machine'}. `compute_dtype: auto` picks "
              f"**{auto}** here. Training step: SmolLM2-135M-Instruct, batches of 8 orders "
              f"examples, r=16 on all linear layers, forward + backward + AdamW; bfloat16 = products under autocast, "
              f"float32 adapters; {args.trials} alternating child processes x {args.steps} steps.")
    print(path.read_text())


if __name__ == "__main__":
    main()
