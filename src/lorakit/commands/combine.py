"""`lorakit combine`: several adapters into one (PEFT's add_weighted_adapter, on files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.argtypes import finite_float


def register(commands) -> None:
    from lorakit.adapter_math.combine import METHODS

    parser = commands.add_parser(
        "combine",
        help="combine adapters into one with weights (linear, cat, svd, ties, dare)",
        description="Write one adapter to --output that mixes ADAPTERS by --weights, with PEFT's "
        "add_weighted_adapter rules: cat (exact: the weighted sum of the updates, rank the sum of the ranks), "
        "svd (the exact weighted sum truncated to --svd-rank), linear (mixes A and B separately: cheap, "
        "approximate), ties, dare_linear and dare_ties (prune each adapter to --density first). Adapters must "
        "share a base model; DoRA adapters and adapters that save whole modules are refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("adapters", type=Path, nargs="+", help="LoRA adapter directories")
    parser.add_argument("--weights", type=finite_float, nargs="+", help="one weight per adapter (default: all 1)")
    parser.add_argument("--method", choices=METHODS, default="cat", help="how to combine")
    parser.add_argument("--output", type=Path, required=True, help="directory for the combined adapter")
    parser.add_argument("--svd-rank", type=int, help="svd: rank of the result (default: the largest input rank)")
    parser.add_argument("--density", type=finite_float, default=1.0,
                        help="ties, dare_*: fraction of each adapter's entries kept")
    parser.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random pruning")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.set_defaults(run=_combine)


def _combine(args: argparse.Namespace) -> int:
    from lorakit.adapter_math.combine import combine
    from lorakit.adapter_math.updates import layer_updates, write_updates
    from lorakit.errors import ConfigError
    from lorakit.files.peft_format import read_adapter

    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    if args.svd_rank is not None and args.svd_rank < 1:
        raise ConfigError(f"--svd-rank must be at least 1, got {args.svd_rank}")
    files = [read_adapter(path) for path in args.adapters]
    weights = args.weights if args.weights is not None else [1.0] * len(files)
    updates = [layer_updates(f, str(path)) for f, path in zip(files, args.adapters)]
    transposed = [f.fan_in_fan_out_modules for f in files]
    config, combined = combine([f.config for f in files], updates, weights, args.method, args.svd_rank,
                               args.density, args.seed)
    known = None if any(t is None for t in transposed) else frozenset().union(*transposed)
    write_updates(args.output, config, combined, known)
    print(f"combined adapter ({args.method}, r={config.r}, {len(combined)} layers) written to {args.output}")
    return 0
