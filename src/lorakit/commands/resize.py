"""`lorakit resize`: an adapter cut to a lower rank, each layer's best approximation of its update."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.argtypes import finite_float


def register(commands) -> None:
    parser = commands.add_parser(
        "resize",
        help="truncate an adapter to a lower rank (the best rank-R approximation of each layer's update)",
        description="Write ADAPTER cut to a lower rank to --output: each layer's update s*B*A replaced by its "
        "best approximation of rank --rank (or, with --energy, of the fewest ranks that keep that fraction of "
        "the update's energy, layer by layer), from the update's exact SVD. Prints each layer's relative error. "
        "With --data, also scores the original and the resized adapter (exact match, greedy) on that split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("adapter", type=Path, help="LoRA adapter directory")
    parser.add_argument("--output", type=Path, required=True, help="directory for the resized adapter")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every layer (a layer of lower rank keeps its own)")
    size.add_argument("--energy", type=finite_float, help="keep this fraction of each layer's energy, e.g. 0.99")
    parser.add_argument("--data", type=Path, help="JSONL split to score both adapters on (exact match)")
    parser.add_argument("--base", help="base model for --data (default: the embedded smollm2)")
    parser.add_argument("--limit", type=int, help="score only the first N examples of --data")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.set_defaults(run=_resize)


def _resize(args: argparse.Namespace) -> int:
    from lorakit.adapter_math.resize import resize
    from lorakit.adapter_math.updates import layer_updates, write_updates
    from lorakit.errors import ConfigError
    from lorakit.files.peft_format import read_adapter

    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    if args.output.resolve() == args.adapter.resolve():
        raise ConfigError("--output is the adapter itself; write the resized adapter elsewhere")
    files = read_adapter(args.adapter)
    config, updates, report = resize(files.config, layer_updates(files, str(args.adapter)), args.rank, args.energy)
    width = max(len(t.path) for t in report)
    print(f"{'layer':<{width}}  rank    relative error")
    for t in report:
        print(f"{t.path:<{width}}  {t.old_rank:>3} -> {t.new_rank:<3} {t.relative_error:.2e}")
    errors = sorted(t.relative_error for t in report)
    print(f"relative error of the update: median {errors[len(errors) // 2]:.2e}, largest {errors[-1]:.2e}")
    write_updates(args.output, config, updates, files.fan_in_fan_out_modules)
    print(f"resized adapter (r={config.r}) written to {args.output}")
    if args.data is not None:
        from lorakit.evaluation.evaluate import adapters_exact_match

        before, after = adapters_exact_match(args.base, [args.adapter, args.output], args.data, args.limit,
                                             progress=True)
        print(f"exact match on {args.data}: {100 * before:.1f}% (r={files.config.r}) -> {100 * after:.1f}% "
              f"(r={config.r}), {100 * (after - before):+.1f} points")
    return 0
