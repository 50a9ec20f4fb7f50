"""`lorakit export`: an adapter in another tool's format (today: a llama.cpp LoRA GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="write an adapter in another tool's format: --gguf-lora for llama.cpp",
        description="Write a LoRA adapter for another runtime. --gguf-lora ADAPTER writes a llama.cpp LoRA adapter "
        "GGUF (run it with `llama-cli -m BASE.gguf --lora FILE.gguf`, or llama-cpp-python's lora_path): A and B "
        "of every adapted linear layer under llama.cpp's tensor names, q/k rows in its rotary order, one alpha. "
        "The adapter stays separate from the base, as in lorakit. A QA-LoRA adapter cannot run in llama.cpp's "
        "LoRA loader: merge it into its 4-bit base with `lorakit merge --gguf` instead. Llama-family bases only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--gguf-lora", type=Path, required=True, metavar="ADAPTER", help="LoRA adapter directory")
    parser.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    parser.add_argument("--base", default="smollm2",
                        help="the base's GGUF file (llama.cpp runs the adapter on it), or smollm2 (the embedded "
                        "default); its architecture, head counts and tensor shapes are checked against the adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from lorakit.adapter_math.gguf_lora import export_gguf_lora
    from lorakit.errors import ConfigError
    from lorakit.files.peft_format import read_adapter
    from lorakit.models.base import gguf_source

    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    if args.output.suffix != ".gguf":
        raise ConfigError(f"--output {args.output}: name the file .gguf (llama.cpp's loaders expect it)")
    base = gguf_source(args.base)
    report = export_gguf_lora(read_adapter(args.gguf_lora), base, args.output)
    folded = f", {report.folded} layers' own scale folded into B" if report.folded else ""
    print(f"llama.cpp LoRA GGUF written to {report.output}: {report.layers} layers, alpha {report.alpha:g}{folded}")
    print(f"run it with: llama-cli -m {base} --lora {report.output}")
    return 0
