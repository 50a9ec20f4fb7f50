"""`lorakit compare`: LoRA against full fine-tuning, prompt and prefix tuning, IA³ and bottleneck adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.argtypes import finite_float
from lorakit.methods.method import METHOD_NAMES


def register(commands) -> None:
    parser = commands.add_parser(
        "compare",
        help="train several methods (LoRA, full, prompt, prefix, ia3, adapter) on one recipe and compare them",
        description="Train each method on the recipe's data with the same number of steps, score each on the "
        "test split (or the same training time: --budget-min), and print one table: exact match, test and validation loss, trainable parameters, stored "
        "size, step time, peak training memory, added forward latency unmerged and merged, and whether "
        "`lorakit serve` serves it. Writes OUTPUT/compare.md and OUTPUT/compare.png; each method's run lies in "
        "OUTPUT/METHOD. Run the same command again to resume an interrupted comparison. LoRA uses the recipe's "
        "learning rate, every other method its own default. LoRA's variants compare as methods of their own: "
        "rslora, dora, pissa, olora and loraplus (LoRA with that switch on, the recipe's settings otherwise).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="training recipe (YAML), as for lorakit train")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="comma-separated methods to compare (also: rslora, dora, pissa, olora, loraplus)")
    parser.add_argument("--test", type=Path, default=Path("data/orders/test.jsonl"), help="JSONL split to score on")
    parser.add_argument("--max-steps", type=int, help="steps for every method (default: the recipe's max_steps)")
    parser.add_argument("--budget-min", type=finite_float, metavar="MINUTES",
                        help="instead of a number of steps, the same training time for every method: as many steps "
                        "as fit in MINUTES, from each method's step time on a short calibration run")
    parser.add_argument("--limit", type=int, help="score the first N test examples only")
    parser.add_argument("--lr", type=finite_float,
                        help="learning rate for LoRA and its variants (default: the recipe's); other methods keep "
                        "their own")
    parser.add_argument("--output", type=Path, default=Path("out/compare"), help="directory for every run and "
                        "the table")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="draw no progress bars")
    parser.set_defaults(run=_compare)


def _compare(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.files.atomic import atomic_write_text
    from lorakit.train.compare import compare
    from lorakit.train.compare_report import markdown, plot

    if args.limit is not None and args.limit < 1 or args.max_steps is not None and args.max_steps < 1:
        raise ConfigError("--limit and --max-steps must be at least 1")
    if args.budget_min is not None and args.budget_min <= 0:
        raise ConfigError("--budget-min must be a positive number of minutes")
    if args.lr is not None and args.lr <= 0:
        raise ConfigError("--lr must be a positive learning rate")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    comparison = compare(args.config, methods, args.output, args.test, args.max_steps, args.limit, args.progress,
                         args.budget_min, args.lr)
    table = markdown(comparison)
    atomic_write_text(args.output / "compare.md", table)
    chart = plot(comparison, args.output / "compare.png")
    print(table)
    print(f"written: {args.output / 'compare.md'}" + (f", {chart}" if chart else ""))
    return 0
