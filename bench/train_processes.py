"""Training throughput on one process vs several: `lorakit train` as a user runs it, on the real
SmolLM2-135M-Instruct with the demo recipe (configs/smollm2-orders.yaml).

Three ways to run the same steps with the same global batch: one process using every core; N
processes replicating the model (DDP); N processes sharding its decoder layers (FSDP). With
--nproc, lorakit gives each of N processes cores/N threads. Each run is one `lorakit train`
command; the order of the three alternates between trials so machine noise hits them alike.
Throughput is the tokens of steps 2.. over their time (step 1 warms up); the losses of the three
must agree, which the table also reports, with the model memory each process holds (from
`lorakit train`'s summary line). Writes bench/results/train_processes_cpu.md.

    python bench/train_processes.py [--nproc 2] [--steps 6] [--batch 8] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import write_table

RECIPE = ROOT / "configs" / "smollm2-orders.yaml"


def run(layout: str, args: argparse.Namespace, output: Path) -> dict:
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(RECIPE), "--output", str(output),
               "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--val", "", "--save-every", "0",
               "--overwrite"]
    if layout != "1 process":
        command += ["--nproc", str(args.nproc), "--parallel", layout.split()[-1]]
    log = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stderr
    held = re.search(r"each holds ([\d,]+) MiB of the model's ([\d,]+) MiB", log)
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = [s for s in steps if "loss" in s][1:]
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in timed)
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "losses": [s["loss"] for s in steps if "loss" in s],
            "held_mib": int(held[1].replace(",", "")) if held else None,
            "model_mib": int(held[2].replace(",", "")) if held else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()

    layouts = ("1 process", f"{args.nproc} processes, ddp", f"{args.nproc} processes, fsdp")
    results: dict[str, list[dict]] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory() as scratch:
        for trial in range(args.trials):
            for i, layout in enumerate(layouts if trial % 2 == 0 else layouts[::-1]):
                results[layout].append(run(layout, args, Path(scratch) / str(i)))
                print(f"trial {trial + 1}/{args.trials} {layout:22s} "
                      f"{results[layout][-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    one = statistics.median(r["tokens_per_s"] for r in results[layouts[0]])
    reference = results[layouts[0]][0]["losses"]
    model_mib = results[layouts[1]][0]["model_mib"]
    rows = []
    for layout in layouts:
        speed = statistics.median(r["tokens_per_s"] for r in results[layout])
        losses = results[layout][0]["losses"]
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        held = results[layout][0]["held_mib"] or model_mib
        rows.append([layout, f"{speed:.0f}", f"**{speed / one:.2f}x**", f"{gap:.1e}", f"{held} of {model_mib}"])
    cores = os.cpu_count()
    command = (f"python bench/train_processes.py --nproc {args.nproc} --steps {args.steps} --batch {args.batch} "
               f"--trials {args.trials}")
    notes = (f"{cores} cores: one process uses {cores} threads, each of {args.nproc} processes {max(1, cores // args.nproc)}. "
             f"Global batch {args.batch}, {args.steps} steps of the demo recipe, median of {args.trials} trials; "
             "tokens/s counts every token of steps 2 onwards (step 1 warms up). 'loss gap' is the largest "
             "relative difference of a step's loss from the one-process run's.")
    path = write_table("train_processes_cpu", "lorakit train on one process vs several (SmolLM2-135M, orders)",
                       command, ["layout", "tokens/s", "vs 1 process", "loss gap",
                                                            "model MiB per process"], rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
