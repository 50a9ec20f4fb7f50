"""`lorakit merge`: fold an adapter into its base and write the merged model (float, 4-bit, or GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.quant.groupwise import BITS, GROUP_SIZES


def register(commands) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge an adapter into its base model and save the result (float, quantized or GGUF)",
        description="Merge --adapter into its base and save the merged model to --output: zero added latency, "
        "no lorakit needed to run it. A QA-LoRA adapter (trained with quant_bits) merges exactly into its 4-bit "
        "base: only each group's min moves, so the result is still 4-bit and computes what the adapter did. "
        "A plain LoRA adapter merges into float weights, saved as an ordinary transformers model, or with "
        "--requantize re-quantized afterwards (QLoRA's way, which moves the weights off the trained grid). "
        "Prints how far the merged model's logits are from the unmerged adapter's on a probe sentence.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", type=Path, required=True, help="adapter directory")
    parser.add_argument("--output", type=Path, required=True, help="directory for the merged model")
    parser.add_argument("--base", default="smollm2",
                        help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    parser.add_argument("--requantize", type=int, choices=BITS, metavar="BITS",
                        help="quantize a plain LoRA merge to this many bits afterwards (2, 3, 4 or 8)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=32, help="group size for --requantize")
    parser.add_argument("--gguf", type=Path, metavar="FILE",
                        help="also write a GGUF Q4_1 file (4-bit, group 32 results from a GGUF base only)")
    parser.add_argument("--fp32-mins", action="store_true",
                        help="QA-LoRA: keep the merged mins in float32 rather than float16, so the merged model "
                        "equals the unmerged one to float32 rounding (half a bit more per weight at group 32; "
                        "not with --gguf, whose Q4_1 blocks hold float16 mins)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output or --gguf")
    parser.set_defaults(run=_merge)


def _merge(args: argparse.Namespace) -> int:
    from lorakit.models.merged import merge_to_directory

    report = merge_to_directory(args.base, args.adapter, args.output, args.requantize, args.group_size, args.gguf,
                                args.fp32_mins, args.overwrite)
    if report.spec is not None:
        how = "re-quantized" if report.requantized else "exact: codes and scales unchanged, mins shifted"
        print(f"merged model written to {report.output} ({report.spec}, {how})")
    else:
        print(f"merged model written to {report.output} (float weights)")
    print("merged vs unmerged logits on a probe sentence: relative error |merged - unmerged| / |unmerged| = "
          f"{report.probe_error:.2e}")
    if args.gguf is not None:
        print(f"GGUF Q4_1 written to {args.gguf} (metadata and other tensors from {report.gguf_template.name})")
    return 0
