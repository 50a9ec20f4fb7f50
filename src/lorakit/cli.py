"""The ``lorakit`` command. A user's mistake prints one line, ``error: ...``, and exits 2."""

from __future__ import annotations

import argparse
import os
import sys

from lorakit import __version__
from lorakit.commands import (
    combine,
    compare,
    compress,
    evaluate,
    export,
    generate,
    info,
    merge,
    quantize,
    rank,
    resize,
    serve,
    train,
)
from lorakit.errors import LorakitError
from lorakit.process_memory import keep_freed_memory


def run() -> int:
    """The installed ``lorakit`` program: ``main`` in a process whose allocator keeps freed memory
    (process_memory.py). Tests call ``main`` and keep their own process as it is."""
    keep_freed_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    args.argv = list(argv if argv is not None else sys.argv[1:])  # what `train --nproc` hands torchrun
    try:
        return args.run(args)
    except LorakitError as err:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Low-Rank Adaptation (LoRA) for PyTorch models, with adapter files in PEFT's format.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in (train, compare, evaluate, generate, merge, export, rank, resize, combine, quantize, compress,
                    info, serve):
        command.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
