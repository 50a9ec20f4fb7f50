"""`lorakit quantize`: write a base model with group-wise N-bit linear layers, for QA-LoRA training."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.quant.groupwise import BITS, GROUP_SIZES


def register(commands) -> None:
    parser = commands.add_parser(
        "quantize",
        help="quantize a base model's linear layers group-wise (2/3/4/8 bits) and save it",
        description="Quantize every linear layer but the output head group-wise: per group of --group-size "
        "inputs, a float16 scale and min and N-bit codes (packed). The result is a model directory lorakit "
        "loads with --base, to train QA-LoRA on (lorakit train --base DIR) or to serve. From the embedded "
        "SmolLM2 (or any Llama GGUF in Q4_1) at 4 bits and group 32 the file's own blocks are kept as they "
        "are, without re-quantizing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", default="smollm2",
                        help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    parser.add_argument("--bits", type=int, choices=BITS, default=4, help="bits per weight")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=32,
                        help="inputs per group (each has its own scale and min)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the quantized model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.set_defaults(run=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.models.base import load_base
    from lorakit.models.quantized import QuantSpec, save_quantized
    from lorakit.quant.linear import QuantLinear

    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    model, tokenizer = load_base(args.base, quant=QuantSpec(args.bits, args.group_size))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.quantized.nbytes for m in layers)
    dense = sum(4 * m.in_features * m.out_features for m in layers)
    save_quantized(model, tokenizer, args.output)
    print(f"{len(layers)} linear layers quantized to {args.bits} bits in groups of {args.group_size}: "
          f"{packed / 2**20:.1f} MiB instead of {dense / 2**20:.1f} MiB in float32 ({packed / dense:.3f}x); "
          f"written to {args.output}")
    return 0
