"""Which r for the demo task: plain LoRA trained at r = 1, 2, 4, 8, 16, 64 on the demo recipe, each
scored on the test split and read with `lorakit rank`; and the r=64 adapter cut to r=8 with
`lorakit resize`, scored beside the one trained at r=8.

    python bench/ranks.py [--ranks 1,2,4,8,16,64] [--output out/ranks]

alpha = 2r for every rank (the demo's alpha/r = 2). Each rank trains in its own process,
`lorakit train --config configs/smollm2-orders.yaml --r R --alpha 2R --output OUTPUT/rR`; a run already
finished in OUTPUT is scored again, not trained again. Writes bench/results/ranks_cpu.md and ranks_cpu.png.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, machine

RESIZE_FROM, RESIZE_TO = 64, 8


def train(r: int, output: Path) -> Path:
    directory = output / f"r{r}"
    if not (directory / "adapter_config.json").is_file():
        subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", "configs/smollm2-orders.yaml", "--r",
                        str(r), "--alpha", str(2 * r), "--output", str(directory), "--overwrite", "--no-progress"],
                       cwd=ROOT, check=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,64")
    parser.add_argument("--output", type=Path, default=ROOT / "out" / "ranks")
    args = parser.parse_args()
    import torch

    from lorakit.adapter_math.resize import resize
    from lorakit.adapter_math.spectrum import spectra
    from lorakit.adapter_math.updates import layer_updates, write_updates
    from lorakit.evaluation.evaluate import adapters_exact_match
    from lorakit.files.peft_format import read_adapter
    from lorakit.train.metrics import read_metrics

    torch.set_num_threads(2)
    started = time.perf_counter()
    ranks = [int(r) for r in args.ranks.split(",")]
    directories = {r: train(r, args.output) for r in ranks}
    resized = args.output / f"r{RESIZE_FROM}-resized-to-r{RESIZE_TO}"
    files = read_adapter(directories[RESIZE_FROM])
    config, updates, report = resize(files.config, layer_updates(files, "r64"), rank=RESIZE_TO)
    write_updates(resized, config, updates, files.fan_in_fan_out_modules)
    scored = [*directories.values(), resized]
    test = ROOT / "data" / "orders" / "test.jsonl"
    exact = dict(zip(scored, adapters_exact_match("smollm2", scored, test, batch_size=32, progress=True)))

    rows = []
    for r, directory in directories.items():
        files = read_adapter(directory)
        found = spectra(layer_updates(files, str(directory)))
        params = sum(t.numel() for t in files.tensors.values())
        val = [m["val_loss"] for m in read_metrics(directory / "metrics.jsonl") if "val_loss" in m]
        rank99 = [s.rank_for(0.99) for s in found]
        rows.append((f"r={r}", f"{params:,}", f"{100 * exact[directory]:.1f}%", f"{val[-1]:.4f}",
                     f"{statistics.median(s.rank_for(0.9) for s in found):g}", f"{statistics.median(rank99):g}",
                     f"{max(rank99)}", "-"))
    errors = sorted(t.relative_error for t in report)
    params = sum(t.numel() for t in read_adapter(resized).tensors.values())
    rows.append((f"r={RESIZE_FROM} resized to r={RESIZE_TO}", f"{params:,}", f"{100 * exact[resized]:.1f}%", "-", "-",
                 "-", "-", f"median {statistics.median(errors):.2f}, largest {errors[-1]:.2f}"))
    header = ("adapter", "parameters", "exact match (test, 200)", "final val loss", "rank90 (median layer)",
              "rank99 (median layer)", "rank99 (largest layer)", "resize error (relative, per layer)")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    minutes = (time.perf_counter() - started) / 60
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "ranks_cpu.md"
    path.write_text(
        "# Which rank: plain LoRA at r = " + ", ".join(map(str, ranks)) + " on the demo task (SmolLM2-135M-Instruct, "
        "orders), cpu\n\n"
        f"Command: `python bench/ranks.py --ranks {args.ranks}`  \nMachine: {machine()}  \n"
        f"Date: {time.strftime('%Y-%m-%d')}  \nWall time of this run: {minutes:.0f} min (ranks already trained "
        f"in {args.output.name}/ are scored again, not trained again)\n\n" + "\n".join(table) + "\n\n"
        "Every adapter: the demo recipe (120 steps of 8 examples, lr 3e-3, all linear layers) with alpha = 2r. "
        "Exact match: greedy answers on data/orders/test.jsonl, merged. rank90 / rank99: the fewest singular "
        "values of a layer's update s*B*A that hold 90% / 99% of its energy (`lorakit rank`). The resized "
        f"adapter is `lorakit resize OUTPUT/r{RESIZE_FROM} --rank {RESIZE_TO}`: each layer's best rank-{RESIZE_TO} "
        "approximation of the r=64 update.\n", encoding="utf-8")
    plot(ranks, [exact[directories[r]] for r in ranks], exact[resized], RESULTS / "ranks_cpu.png")
    print(path.read_text())


def plot(ranks: list[int], exact: list[float], resized: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    axis.plot(ranks, [100 * e for e in exact], marker="o", label="trained at rank r")
    axis.scatter([RESIZE_TO], [100 * resized], marker="*", s=160, color="tab:red",
                 label=f"trained at r={RESIZE_FROM}, resized to r={RESIZE_TO}")
    axis.set_xscale("log", base=2)
    axis.set_xticks(ranks, [str(r) for r in ranks])
    axis.set(xlabel="LoRA rank r (alpha = 2r)", ylabel="exact match on the test split (%)",
             title="Demo task: exact match against rank")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
