"""The comparison as a markdown table and a chart (accuracy against trainable parameters)."""

from __future__ import annotations

from pathlib import Path

from lorakit.train.compare import Comparison

NAMES = {"lora": "LoRA", "full": "full fine-tuning", "prompt": "prompt tuning", "prefix": "prefix tuning",
         "ia3": "IA³", "adapter": "bottleneck adapters", "rslora": "rsLoRA", "dora": "DoRA", "pissa": "PiSSA",
         "olora": "OLoRA", "loraplus": "LoRA+"}


def markdown(comparison: Comparison) -> str:
    s = comparison.settings
    budget = (f"{s['budget_min']:g} minutes of training steps" if s["budget_min"] else f"{s['steps']} steps")
    lines = [(f"Base model exact match: {100 * comparison.base_exact_match:.1f}% on {comparison.examples} examples of "
             f"{s['test']}; every method: {budget} of {s['batch_size']}x{s['grad_accum']} examples of "
             f"{s['train']} on {s['base']}; LoRA and its variants at learning rate {s.get('lr', 0):g}"
             + (f"; answers copy {', '.join(s['copy_fields'])} from the message (copy-aligned targets, copy "
                "decoding)." if s.get("copy_fields") else ".")), "",
             ("| method | exact match | test loss | val loss | steps | training | trainable parameters | stored | step time | "
             "peak memory (training) | forward, unmerged | merged | served by `lorakit serve` |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in comparison.results:
        val = f"{r.val_loss:.3f}" if r.val_loss is not None else "-"
        merged = _latency(r.merged_latency, r.base_latency) if r.merged_latency is not None else "cannot merge"
        if r.method == "full":
            merged = "is the model"
        served = {"full": "yes, as the base", "ia3": "merged into the base, as the base"}.get(r.method, "no")
        if r.servable and r.method not in ("full", "ia3"):
            served = "yes, batched beside other adapters"
        lines.append(f"| {NAMES[r.method]} | {100 * r.exact_match:.1f}% | {r.test_loss:.3f} | {val} | {r.steps} | "
                     f"{r.train_seconds / 60:.1f} min | "
                     f"{r.trainable:,} | {_size(r.stored_bytes)} | {1000 * r.step_seconds:.0f} ms | "
                     f"{_size(r.peak_bytes)} | {_latency(r.latency, r.base_latency)} | {merged} | {served} |")
    lines += ["", ("Forward: one pass over a 128-token prompt, the fastest of 15, and in brackets its difference from "
                  "the base model's, timed alternately with it (the method switched off) on the same loaded model. "
                  "Training: the training process from start to end (loading, steps, validation, saving). Peak memory: "
                  "its peak resident set.")]
    return "\n".join(lines) + "\n"


def _latency(seconds: float, base: float) -> str:
    return f"{1000 * seconds:.0f} ms ({100 * (seconds / base - 1):+.0f}%)"


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def plot(comparison: Comparison, path: Path) -> Path | None:
    """Exact match against trainable parameters (log scale), one point per method; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in comparison.results:
        axis.scatter(r.trainable, 100 * r.exact_match, s=60)
        axis.annotate(NAMES[r.method], (r.trainable, 100 * r.exact_match), textcoords="offset points",
                      xytext=(6, 4))
    axis.axhline(100 * comparison.base_exact_match, color="grey", linestyle="--", label="base model")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("exact match on the test split (%)")
    s = comparison.settings
    budget = f"{s['budget_min']:g} min" if s["budget_min"] else f"{s['steps']} steps"
    axis.set_title(f"{budget} each on {Path(s['train']).name}")
    axis.legend(loc="lower right")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
