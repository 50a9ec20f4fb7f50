"""What keeping freed memory (src/lorakit/process_memory.py) does to `lorakit train` and `lorakit
eval` as a user runs them: glibc's default malloc policy against the command's own.

Each run is one command, with LORAKIT_KEEP_FREED_MEMORY=0 (glibc's defaults: large blocks mmap()ed
and unmapped on free, the heap trimmed) or unset (the command's policy); the two alternate between
trials so machine noise hits both alike. Per command: wall time, CPU time in user space and in the
kernel, minor page faults and peak resident memory (the child's own rusage), and for training the
steps' own time from metrics.jsonl (steps 2..; step 1 warms up). The evaluation scores make demo's
adapter (out/orders) on the hand-written orders, as make demo does; it is skipped without one.
Writes bench/results/process_memory_cpu.md.

    python bench/process_memory.py [--steps 30] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import write_table

RECIPE = ROOT / "configs" / "smollm2-orders.yaml"
DEMO_ADAPTER = ROOT / "out" / "orders"
POLICIES = {"glibc's default": "0", "kept (lorakit's)": "1"}


def measured(command: list[str], keep: str) -> dict:
    """Run ``command`` to the end: its wall time and its own rusage (os.wait4 reaps it and reads both)."""
    env = dict(os.environ, LORAKIT_KEEP_FREED_MEMORY=keep)
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen does not wait for it again
    if child.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)} (run it alone to see why)")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults": usage.ru_minflt,
            "rss_mib": usage.ru_maxrss / 1024}


def train_command(output: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--config", str(RECIPE), "--output", str(output),
            "--max-steps", str(steps), "--val", "", "--save-every", "0", "--overwrite"]


EVAL_COMMAND = [sys.executable, "-m", "lorakit", "eval", "--adapter", str(DEMO_ADAPTER), "--data",
                str(ROOT / "data" / "orders" / "real.jsonl"), "--no-base", "--copy-fields", "item,deliver_to",
                "--compute-dtype", "auto"]


def step_seconds(output: Path) -> float:
    """The training steps' own time, steps 2.. (from metrics.jsonl)."""
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = [s for s in steps if "loss" in s][1:]
    return sum(s["tokens"] / s["tokens_per_s"] for s in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (the demo recipe)")
    parser.add_argument("--trials", type=int, default=2, help="runs per policy and command, alternating")
    args = parser.parse_args()
    evaluate = (DEMO_ADAPTER / "adapter_model.safetensors").exists()
    if not evaluate:
        print("no out/orders (run make demo first): training only", flush=True)

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for trial in range(args.trials):
            for policy, keep in POLICIES.items() if trial % 2 == 0 else reversed(POLICIES.items()):
                output = Path(scratch) / "adapter"
                run = measured(train_command(output, args.steps), keep)
                run["steps"] = step_seconds(output)
                results.setdefault(("train", policy), []).append(run)
                if evaluate:
                    results.setdefault(("eval", policy), []).append(measured(EVAL_COMMAND, keep))
                print(f"trial {trial + 1}/{args.trials} {policy}: "
                      + ", ".join(f"{what} {runs[-1]['wall']:.1f} s" for (what, p), runs in results.items() if p == policy),
                      flush=True)

    rows = []
    for (what, policy), runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        default = results[(what, "glibc's default")]
        ratio = median["wall"] / statistics.median(r["wall"] for r in default)
        steps = f"{median['steps']:.1f} s" if "steps" in median else "-"
        rows.append([f"{what}: {policy}", f"{median['wall']:.1f} s", f"**{ratio:.2f}x**", steps,
                     f"{median['user']:.1f} s", f"{median['sys']:.1f} s", f"{median['faults'] / 1e3:,.0f}k",
                     f"{median['rss_mib']:,.0f} MiB"])
    command = f"python bench/process_memory.py --steps {args.steps} --trials {args.trials}"
    notes = (f"train: `lorakit train --config configs/smollm2-orders.yaml --max-steps {args.steps} --val ''` "
             "(its steps 2.. in 'steps'); eval: make demo's second evaluation (out/orders on data/orders/real.jsonl). "
             "Each run one process; medians of the trials, the two policies alternating. 'kernel CPU' is CPU time "
             "spent in the kernel, most of it page faults; 'faults' counts minor page faults. The default is "
             "LORAKIT_KEEP_FREED_MEMORY=0.")
    path = write_table("process_memory_cpu", "Keeping freed memory: lorakit train and eval, glibc's default vs kept",
                       command, ["command: malloc policy", "wall", "vs default", "steps", "user CPU", "kernel CPU",
                                 "faults", "peak RSS"], rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
