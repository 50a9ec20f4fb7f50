"""`lorakit eval`: exact match and loss on a split, base model and adapter side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="score an adapter on a split: exact match and loss, against the base model",
        description="Generate an answer (greedy) for every example of a chat or prompt/completion JSONL file "
        "and score it: exact match with the reference (as parsed JSON objects when the reference is JSON) and "
        "the loss on the reference answers. Scores the base model (adapter off) and the adapter side by side, "
        "and prints a few examples, misses first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", type=Path,
                        help="adapter directory (none: score the base model alone, e.g. a merged one)")
    parser.add_argument("--data", type=Path, default=Path("data/orders/test.jsonl"), help="JSONL split to score")
    parser.add_argument("--base", default="smollm2",
                        help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    parser.add_argument("--examples", type=int, default=3, help="examples to print")
    parser.add_argument("--no-base", action="store_true", help="score the adapter only")
    parser.add_argument("--unmerged", action="store_true",
                        help="score the adapter computed beside the base layers, as trained, instead of merged into "
                        "them (for a 4-bit QA-LoRA adapter the merge rounds the shifted mins to float16)")
    parser.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from lorakit.data.records import read_records
    from lorakit.errors import ConfigError
    from lorakit.evaluation.evaluate import (
        compare_base_and_adapter,
        report,
        score_model,
    )
    from lorakit.models.base import load_for_inference

    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise ConfigError("--limit and --batch-size must be at least 1")
    model, tokenizer = load_for_inference(args.base, args.adapter)
    if args.adapter is None:
        records = read_records(args.data)[:args.limit]
        score = score_model(model, tokenizer, records, "model", args.batch_size, progress=True)
        shown = sorted(range(len(records)), key=lambda i: score.correct[i])[:args.examples]
        print(report(args.data, records, [score], shown))
        return 0
    records, scores, shown = compare_base_and_adapter(model, tokenizer, args.data, args.limit, args.batch_size,
                                                      with_base=not args.no_base, examples=args.examples,
                                                      progress=True, merged=not args.unmerged)
    print(report(args.data, records, scores, shown))
    return 0
