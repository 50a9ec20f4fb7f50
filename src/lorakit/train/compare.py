"""`lorakit compare`: every method trained on one recipe's data with the same budget, then scored.

Each method trains in its own process (``lorakit train --method M``), so its peak memory is its own
(the process's peak resident set, read from the kernel when it exits) and a crash or Ctrl-C loses
only that method's run: a method whose training finished is not trained again (only scored), one
interrupted resumes from its last checkpoint. The budget is the same number of steps for every
method, or (``budget_min``) the same training time. Everything else is measured here, on the same
test split for every method: exact match and loss, trainable parameters, the size of what must be
stored, median step time (from the run's metrics), and the latency of one forward pass over a
128-token prompt, unmerged and (where the method merges) merged, against the base model's.

Learning rates: LoRA takes the recipe's; every other method its own default (``lorakit train --help``),
since a rate tuned for LoRA is far too large for full fine-tuning and far too small for soft prompts.
LoRA's variants (``LORA_VARIANTS``: rsLoRA, DoRA, PiSSA, OLoRA, LoRA+) are compared as methods of their
own: LoRA with the recipe's settings and rate, and that variant's switch on.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.core.adapters import disable_adapters
from lorakit.core.merge import merge
from lorakit.data.records import read_records
from lorakit.errors import ConfigError
from lorakit.evaluation.evaluate import score_model
from lorakit.files.atomic import atomic_write_text
from lorakit.methods.ia3 import merge_ia3
from lorakit.methods.method import METHOD_NAMES, method_of_directory, methods_disabled
from lorakit.models.base import load_for_inference
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import TrainConfig, from_sources
from lorakit.train.metrics import METRICS_FILE, read_metrics

RESULT_FILE = "compare.json"  # a method's scores, for reading (each run scores again)
TRAINED_FILE = "trained.json"  # a finished training run's budget, steps, peak memory and time
# LoRA with one variant switched on: the `lorakit train` flags that make it.
LORA_VARIANTS = {"rslora": ["--use-rslora"], "dora": ["--use-dora"], "pissa": ["--init", "pissa"],
                 "olora": ["--init", "olora"], "loraplus": ["--loraplus-lr-ratio", "16"]}
CALIBRATION_STEPS = 4  # steps of a method's short run that measures its step time for --budget-min
PROBE_TOKENS = 128


@dataclass
class MethodResult:
    method: str
    exact_match: float
    test_loss: float
    val_loss: float | None
    trainable: int
    stored_bytes: int
    step_seconds: float  # median over the run
    train_seconds: float  # the training process, start to end
    peak_bytes: int  # the training process's peak resident set
    base_latency: float  # seconds per forward of the probe with the method switched off (the base model)
    latency: float  # seconds per forward of the probe, unmerged
    merged_latency: float | None  # the same after merging; None: the method does not merge
    mergeable: bool
    servable: bool
    steps: int


@dataclass
class Comparison:
    results: list[MethodResult]
    base_exact_match: float
    examples: int
    settings: dict  # what every method shared


def compare(recipe: Path, methods: list[str], output: Path, test: Path, max_steps: int | None = None,
            limit: int | None = None, progress: bool = True, budget_min: float | None = None,
            lr: float | None = None) -> Comparison:
    """Train and score each of ``methods``: ``max_steps`` steps each (default: the recipe's), or with
    ``budget_min``, as many steps as fit in that many minutes of training for each (measured on a
    short calibration run of the method first). ``lr`` replaces the recipe's rate for LoRA and its variants."""
    if max_steps and budget_min:
        raise ConfigError("give --max-steps or --budget-min, not both")
    unknown = [m for m in methods if m not in METHOD_NAMES and m not in LORA_VARIANTS]
    if unknown or not methods:
        raise ConfigError(f"--methods takes a comma-separated list of {', '.join(METHOD_NAMES)} or LoRA's variants "
                          f"{', '.join(LORA_VARIANTS)}; got {unknown or '-'}")
    config = from_sources(recipe, None)
    if max_steps:
        config = TrainConfig(**{**config.to_dict(), "max_steps": max_steps})
    if lr:
        config = TrainConfig(**{**config.to_dict(), "lr": lr})
    records = read_records(test)[:limit]
    output.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_for_inference(config.base, None)
    probe = _probe(tokenizer, base)
    copy_fields = frozenset(config.copy_fields)  # decoded as the recipe trains them (data/copy_aligned.py)
    base_score = score_model(base, tokenizer, records, "base model", config.batch_size, progress,
                             copy_fields=copy_fields)
    del base
    bar = _bar(len(methods), progress)
    results = []
    for method in methods:
        if bar is not None:
            bar.set_description(f"compare: {method}")
        budget = {"budget_min": budget_min, "steps": None if budget_min else config.max_steps}
        if lr:  # a run trained at the recipe's rate does not count as one at this rate
            budget["lr"] = lr
        training = _trained_before(output / method, budget)
        if training is None:
            steps = _steps_within(method, recipe, config, output, budget_min, progress) if budget_min else \
                config.max_steps
            training = _train(method, recipe, TrainConfig(**{**config.to_dict(), "max_steps": steps}), output / method,
                              budget, progress)
        results.append(_score(method, config.base, output / method, training, records, probe, tokenizer,
                              config.batch_size, progress, copy_fields))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    settings = {"base": config.base, "train": config.train, "test": str(test), "budget_min": budget_min,
                "steps": None if budget_min else config.max_steps,
                "batch_size": config.batch_size, "grad_accum": config.grad_accum, "max_length": config.max_length,
                "lr": config.lr, "copy_fields": sorted(copy_fields)}
    return Comparison(results, base_score.exact_match, len(records), settings)


def _trained_before(directory: Path, budget: dict) -> dict | None:
    """What training ``directory`` recorded, if it finished under the same budget (then it is not
    trained again; scoring is redone, which is quick)."""
    path = directory / TRAINED_FILE
    if not path.is_file():
        return None
    training = json.loads(path.read_text(encoding="utf-8"))
    return training if training.get("budget") == budget else None


def _train(method: str, recipe: Path, config: TrainConfig, directory: Path, budget: dict, progress: bool) -> dict:
    peak, seconds = _train_in_own_process(method, recipe, config, directory, progress)
    training = {"budget": budget, "steps": config.max_steps, "peak_bytes": peak, "train_seconds": seconds}
    atomic_write_text(directory / TRAINED_FILE, json.dumps(training, indent=2) + "\n")
    return training


def _score(method: str, base: str, directory: Path, training: dict, records: list[dict], probe: torch.Tensor,
           tokenizer, batch_size: int, progress: bool, copy_fields: frozenset[str]) -> MethodResult:
    model, _ = load_for_inference(None if method == "full" else base, directory)
    trained = method_of_directory(directory)
    trainable = sum(p.numel() for p in (model.parameters() if method == "full" else trained.slots(model).values()))
    if method in ("pissa", "olora"):  # its file holds the initial A0 and B0 beside the trained A and B
        trainable //= 2
    score = score_model(model, tokenizer, records, method, batch_size, progress, copy_fields=copy_fields)
    merged_model = None
    if trained.mergeable and method != "full":  # a merged copy, timed beside the base and the unmerged model
        merged_model = copy.deepcopy(model)
        merge(merged_model) if trained.name == "lora" else merge_ia3(merged_model)
    base_latency, latency, merged = _latencies(model, probe, merged_model)
    metrics = read_metrics(directory / METRICS_FILE)
    steps = [r["tokens"] / r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    stored = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    result = MethodResult(method, score.exact_match, score.loss, val[-1] if val else None, trainable, stored,
                          statistics.median(steps), training["train_seconds"], training["peak_bytes"], base_latency,
                          latency, merged, trained.mergeable, trained.servable, training["steps"])
    atomic_write_text(directory / RESULT_FILE, json.dumps({**asdict(result), "examples": len(records)}, indent=2) + "\n")
    return result


def _steps_within(method: str, recipe: Path, config: TrainConfig, output: Path, budget_min: float,
                  progress: bool) -> int:
    """How many of ``method``'s steps fit in ``budget_min`` minutes: its median step time over a short
    run (the first step, which warms up, left out), in a scratch directory removed afterwards."""
    scratch = output / f".{method}-calibration"
    short = TrainConfig(**{**config.to_dict(), "max_steps": CALIBRATION_STEPS})
    _train_in_own_process(method, recipe, short, scratch, progress, ["--val", "", "--save-every", "0"])
    metrics = read_metrics(scratch / METRICS_FILE)
    seconds = statistics.median([r["tokens"] / r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")][1:])
    shutil.rmtree(scratch, ignore_errors=True)
    return max(1, int(60 * budget_min / seconds))


def _train_in_own_process(method: str, recipe: Path, config: TrainConfig, directory: Path,
                          progress: bool, extra: list[str] = ()) -> tuple[int, float]:
    """(peak resident bytes, seconds) of ``lorakit train --method METHOD`` (or a LoRA variant) into ``directory``."""
    lora = method == "lora" or method in LORA_VARIANTS
    lr = config.lr if lora else 0.0  # 0: the method's own default
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(recipe),
               "--method", "lora" if lora else method, *LORA_VARIANTS.get(method, []),
               "--output", str(directory), "--max-steps", str(config.max_steps), "--lr", repr(lr)]
    command.append("--resume" if latest_checkpoint(directory) is not None else "--overwrite")
    command += extra
    if not progress:
        command.append("--no-progress")
    started = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise ConfigError(f"training {method} failed (exit status {child.returncode}; its error is above); run "
                          "the same command again to resume the comparison")
    return usage.ru_maxrss * 1024, time.perf_counter() - started  # ru_maxrss is in KiB on Linux


def _probe(tokenizer, model) -> torch.Tensor:
    """A fixed 128-token input: the latency probe every method is timed on."""
    ids = tokenizer("Please deliver " * PROBE_TOKENS, add_special_tokens=False).input_ids[:PROBE_TOKENS]
    return torch.tensor([ids], device=next(model.parameters()).device)


@torch.no_grad()
def _latencies(model, probe: torch.Tensor, merged=None, repeats: int = 15) -> tuple[float, float, float | None]:
    """(base, method, merged): seconds of one forward pass over the probe with the method switched off,
    on, and merged into a copy (None without one), timed in turn so that the machine's load falls on
    all alike; the fastest of ``repeats`` each (on a shared machine other work only ever adds time).
    A fully fine-tuned model is its own base."""
    def timed(run) -> float:
        started = time.perf_counter()
        run(input_ids=probe)
        return time.perf_counter() - started

    model(input_ids=probe)
    if merged is not None:
        merged(input_ids=probe)
    times: dict[str, list[float]] = {"base": [], "method": [], "merged": []}
    for _ in range(repeats):
        with disable_adapters(model), methods_disabled(model):
            times["base"].append(timed(model))
        times["method"].append(timed(model))
        if merged is not None:
            times["merged"].append(timed(merged))
    return min(times["base"]), min(times["method"]), min(times["merged"]) if merged is not None else None


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", unit="method", file=sys.stderr, position=0)
