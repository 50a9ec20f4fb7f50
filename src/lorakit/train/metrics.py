"""Training metrics: one JSON object per line in OUTPUT/metrics.jsonl, and a loss-curve PNG.

Lines are {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...} for training steps and
{"step", "val_loss"} for validations. On resume the file is cut back to the checkpoint's step,
so it always reads as one uninterrupted run. Its lines reach the disk (fsync) before a checkpoint
is declared written, so a checkpoint never runs ahead of the metrics it resumes; a process killed
while appending leaves at most a torn last line, which resuming drops (and says so).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.files.atomic import atomic_path, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    def __init__(self, output: Path, resume_step: int | None) -> None:
        self.path = output / METRICS_FILE
        kept = []
        if resume_step is not None:
            records, torn = _read(self.path)
            if torn:
                print(f"lorakit: {self.path}: dropped its last line, cut off mid-write when the run stopped "
                      f"({torn[:60]!r}...)", file=sys.stderr)
            kept = [r for r in records if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Put every line written so far on disk."""
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a run killed mid-write) is left out."""
    return _read(path)[0]


def _read(path: Path) -> tuple[list[dict], str]:
    """(records, the torn last line or "")."""
    if not path.is_file():
        return [], ""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if number == len(lines):
                return records, line
            raise LorakitError(f"{path}:{number}: not a metrics line; the file was changed by hand or is damaged; "
                               "restore it or start a new run")
        records.append(record)
    return records, ""


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Training loss (raw and smoothed) and validation loss against the step, and beside them the
    accuracy when the run records one (image classification). None when there is nothing to plot
    or matplotlib is not installed (it is an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    accuracy = [(r["step"], r["accuracy"]) for r in records if "accuracy" in r]
    val_accuracy = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    if not train:
        return None
    panels = 2 if accuracy or val_accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    steps, losses = zip(*train, strict=True)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
    ax.plot(steps, _smoothed(losses), color="tab:blue", linewidth=2, label="train (smoothed)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", linewidth=2, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        if accuracy:
            steps, values = zip(*accuracy, strict=True)
            ax.plot(steps, _smoothed(values), color="tab:blue", linewidth=2, label="train batches (smoothed)")
        if val_accuracy:
            ax.plot(*zip(*val_accuracy, strict=True), "o-", color="tab:orange", linewidth=2, label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("top-1 accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


def _smoothed(values: tuple[float, ...], weight: float = 0.8) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out
