"""The ``lorakit`` command. A user's mistake prints one line, ``error: ...``, and exits 2."""

from __future__ import annotations

import argparse
import sys

from lorakit import __version__
from lorakit.commands import (
    compress,
    evaluate,
    generate,
    info,
    merge,
    quantize,
    serve,
    train,
)
from lorakit.errors import LorakitError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except LorakitError as err:
        print(f"error: {err}", file=sys.stderr)
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
    for command in (train, evaluate, generate, merge, quantize, compress, info, serve):
        command.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
