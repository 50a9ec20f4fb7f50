"""`lorakit compress`: low-rank (truncated SVD) and optionally int8 linear layers for CPU deployment,
with size, speed and task score before and after."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lorakit.argtypes import finite_float

DECODE_PROMPT = "Order: two large pepperoni pizzas and a cola, to 5 Oak Road."


def register(commands) -> None:
    parser = commands.add_parser(
        "compress",
        help="replace linear weights by truncated-SVD low-rank factors (and int8), reporting size, speed, score",
        description="Compress a model for CPU deployment: each targeted Linear weight W (out, in) becomes two "
        "factors of rank r, (out, r) @ (r, in), the best rank-r approximation (truncated SVD), where that is "
        "smaller than W; --int8 then applies PyTorch's dynamic int8 quantization to every Linear layer. With "
        "--adapter the adapter is merged first. Prints size, greedy decoding speed and exact match on --data, "
        "before and after, so the trade is visible. The result (--output) loads with --base DIR in every command.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", default="smollm2",
                        help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    parser.add_argument("--adapter", type=Path, help="an adapter to merge into the base before compressing")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="keep this many singular values in every targeted layer")
    how.add_argument("--energy", type=finite_float,
                     help="per layer, the smallest rank keeping this fraction of sum(S^2), e.g. 0.9")
    parser.add_argument("--targets", nargs="+", default=["all-linear"],
                        help="module names (or name suffixes) to factorise; all-linear: every Linear but the head")
    parser.add_argument("--int8", action="store_true", help="also quantize every Linear to int8 (dynamic)")
    parser.add_argument("--data", type=Path, default=Path("data/orders/test.jsonl"), help="JSONL split to score")
    parser.add_argument("--limit", type=int, default=100, help="score the first N examples (0: skip scoring)")
    parser.add_argument("--output", type=Path, help="directory for the compressed model (omit: report only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.set_defaults(run=_compress)


def _compress(args: argparse.Namespace) -> int:
    from lorakit.core.merge import merge_and_unload
    from lorakit.errors import ConfigError
    from lorakit.models.base import load_for_inference
    from lorakit.models.compress import (
        factorise_linears,
        quantize_int8,
        save_compressed,
    )
    from lorakit.quant.linear import QuantLinear

    if args.output is not None and args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    if args.rank is not None and args.rank < 1 or args.limit < 0:
        raise ConfigError("--rank must be at least 1 and --limit at least 0")
    records = _records(args)
    model, tokenizer = load_for_inference(args.base, args.adapter)
    model = merge_and_unload(model.cpu())
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("the model has group-wise quantized layers; compress works on float models "
                          "(use a float --base, or a plain LoRA adapter)")
    before = _measure("original", model, tokenizer, records)
    targets = "all-linear" if args.targets == ["all-linear"] else tuple(args.targets)
    outcomes = factorise_linears(model, targets, args.rank, args.energy)
    compressed = quantize_int8(model) if args.int8 else model
    after = _measure("compressed", compressed, tokenizer, records)
    print(_layer_summary(outcomes))
    print(_table([before, after]))
    if args.output is not None:
        save_compressed(model, tokenizer, outcomes, args.int8, args.output)
        print(f"compressed model written to {args.output} (load it with --base {args.output})")
    return 0


def _records(args: argparse.Namespace) -> list[dict]:
    from lorakit.data.records import read_records

    return read_records(args.data)[:args.limit] if args.limit else []


def _measure(label: str, model, tokenizer, records: list[dict]) -> dict:
    """Serialized size, greedy decoding speed (batch 1) and exact match of ``model``."""
    from lorakit.evaluation.evaluate import score_model
    from lorakit.models.compress import serialized_bytes

    row = {"label": label, "mib": serialized_bytes(model) / 2**20, "tokens_per_s": _decode_speed(model, tokenizer)}
    if records:
        score = score_model(model, tokenizer, records, label, progress=True)
        row |= {"exact_match": score.exact_match, "loss": score.loss, "n": len(records)}
    return row


def _decode_speed(model, tokenizer, new_tokens: int = 32, runs: int = 3) -> float:
    """Greedy tokens per second for one chat prompt, best of ``runs`` (a single user's latency)."""
    import torch

    from lorakit.generation.prompts import chat_prompt

    prompt = chat_prompt(tokenizer, [{"role": "user", "content": DECODE_PROMPT}])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    best = float("inf")
    with torch.no_grad():
        for _ in range(runs):
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def _layer_summary(outcomes) -> str:
    replaced = [o for o in outcomes if o.replaced]
    dense = sum(o.shape[0] * o.shape[1] for o in outcomes)
    kept = sum(o.rank * sum(o.shape) if o.replaced else o.shape[0] * o.shape[1] for o in outcomes)
    ranks = sorted(o.rank for o in replaced)
    line = (f"{len(replaced)} of {len(outcomes)} targeted layers factorised"
            + (f" (ranks {ranks[0]}..{ranks[-1]})" if ranks else "")
            + f"; targeted weights {dense / 1e6:.1f}M -> {kept / 1e6:.1f}M parameters; "
            f"mean relative weight error {sum(o.error for o in outcomes) / len(outcomes):.3f}")
    if len(replaced) < len(outcomes):
        line += f"\n{len(outcomes) - len(replaced)} layers kept dense: at their rank the factors would not be smaller"
    return line


def _table(rows: list[dict]) -> str:
    lines = [f"{'':<12}{'size MiB':>10}{'decode tok/s':>14}{'exact match':>14}{'loss':>9}"]
    for row in rows:
        score = (f"{100 * row['exact_match']:>13.1f}%{row['loss']:>9.4f}" if "exact_match" in row
                 else f"{'-':>14}{'-':>9}")
        lines.append(f"{row['label']:<12}{row['mib']:>10.1f}{row['tokens_per_s']:>14.1f}{score}")
    if "n" in rows[0]:
        lines.append(f"(exact match on {rows[0]['n']} examples)")
    return "\n".join(lines)
