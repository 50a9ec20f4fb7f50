"""`lorakit merge`: fold an adapter into its base and write the merged model (float, 4-bit, or GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.quant.groupwise import BITS, GROUP_SIZES

PROBE = "A customer writes: please send two boxes of green tea and one teapot to 12 Elm Street by Friday."


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
    import torch

    from lorakit.errors import ConfigError
    from lorakit.generate import load_for_inference
    from lorakit.io.base_model import gguf_source
    from lorakit.io.peft_format import read_adapter_config
    from lorakit.merge import merge_and_unload
    from lorakit.quant.linear import quantize_linears, widen_mins
    from lorakit.quant.model import quantized_spec, save_quantized

    for path in (args.output, args.gguf):
        if path is not None and path.exists() and not args.overwrite:
            raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    config = read_adapter_config(args.adapter)
    if args.gguf is not None and (config.modules_to_save or config.bias != "none"):
        raise ConfigError("GGUF export replaces linear weights only; this adapter also trains "
                          f"{'modules_to_save' if config.modules_to_save else 'biases'}")
    merged_spec = ((config.qalora_bits or 4, config.qalora_group_size) if config.qalora_group_size
                   else (args.requantize, args.group_size))
    if args.gguf is not None and merged_spec != (4, 32):
        raise ConfigError("GGUF Q4_1 holds 4-bit weights in groups of 32; "
                          + ("this QA-LoRA adapter's base is not" if config.qalora_group_size
                             else "merge a plain LoRA adapter with --requantize 4 --group-size 32 to export it"))
    if args.requantize and config.qalora_group_size:
        raise ConfigError("a QA-LoRA adapter merges exactly into its quantized base; leave out --requantize")
    if args.fp32_mins and (args.gguf is not None or not config.qalora_group_size):
        raise ConfigError("--fp32-mins applies to QA-LoRA adapters written to lorakit's format; "
                          "leave out --gguf (Q4_1 stores float16 mins)" if config.qalora_group_size
                          else "--fp32-mins applies to QA-LoRA adapters only; this is a plain LoRA adapter")
    template = gguf_source(args.base) if args.gguf is not None else None
    model, tokenizer = load_for_inference(args.base, args.adapter)
    model = model.cpu()
    if args.fp32_mins:
        widen_mins(model)
    probe = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(probe).logits.float()
        model = merge_and_unload(model)
        if args.requantize:
            quantize_linears(model, args.requantize, args.group_size)
        after = model(probe).logits.float()
    error = ((after - before).norm() / before.norm()).item()

    spec = quantized_spec(model)
    if spec is not None:
        save_quantized(model, tokenizer, args.output)
        how = "re-quantized" if args.requantize else "exact: codes and scales unchanged, mins shifted"
        print(f"merged model written to {args.output} ({spec}, {how})")
    else:
        _save_float(model, tokenizer, args.output)
        print(f"merged model written to {args.output} (float weights)")
    print(f"merged vs unmerged logits on a probe sentence: relative error |merged - unmerged| / |unmerged| = {error:.2e}")
    if args.gguf is not None:
        from lorakit.quant.gguf_export import export_q4_1_gguf

        export_q4_1_gguf(model, template, args.gguf)
        print(f"GGUF Q4_1 written to {args.gguf} (metadata and other tensors from {template.name})")
    return 0


def _save_float(model, tokenizer, output: Path) -> None:
    from lorakit.io.atomic import atomic_directory

    with atomic_directory(output) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
