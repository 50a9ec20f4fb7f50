"""What serving in bfloat16 does to a trained adapter's answers, and what it buys.

The serving engine (`lorakit.serve.engine.Engine`, no HTTP in between) answers every prompt of the
orders test and real splits with the adapter `make demo` trains (out/orders), greedy, once with the
model in float32 and once in bfloat16 (`lorakit serve --dtype float32` / `bfloat16`). For each split:
exact match in each dtype (the same comparison as `lorakit eval`: parsed JSON objects equal), how
many answers are the same text in both, and the decode throughput of the whole split (all rows on
one adapter, at most --batch decoded together). Both models are loaded in the same process, one
after the other, the base from the local cache.

    make demo            # trains out/orders
    python bench/serve_precision.py [--adapter out/orders] [--batch 32]

Writes bench/results/serve_precision_cpu.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("test", "real")
DTYPES = ("float32", "bfloat16")


def answers_in(dtype: str, adapter: Path, records: dict[str, list[dict]], batch: int, max_tokens: int):
    """({split: answer texts}, {split: decoded tokens per second}) of the engine with the model in ``dtype``."""
    from lorakit.data.tokenize import prompt_text
    from lorakit.models.base import load_base
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.sampling import SamplingParams

    model, tokenizer = load_base(dtype=getattr(torch, dtype))
    model.eval()
    registry = AdapterRegistry(model)
    registry.register("orders", adapter)
    engine = Engine(model, tokenizer, max_batch=batch, prepare=registry.acquire, release=registry.release)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompts = {split: [tokenizer(prompt_text(r, tokenizer), add_special_tokens=False)["input_ids"] for r in rs]
               for split, rs in records.items()}
    engine.generate(prompts["test"][:2], ["orders"] * 2, SamplingParams(max_tokens=2, temperature=0))  # warm-up
    texts, speeds = {}, {}
    for split, ids in prompts.items():
        start = time.perf_counter()
        out = engine.generate(ids, ["orders"] * len(ids), params)
        speeds[split] = sum(map(len, out)) / (time.perf_counter() - start)
        texts[split] = [tokenizer.decode(o, skip_special_tokens=True) for o in out]
    return texts, speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, default=ROOT / "out" / "orders",
                        help="a LoRA adapter trained on the orders data (make demo writes out/orders)")
    parser.add_argument("--batch", type=int, default=32, help="requests decoded together (lorakit serve --max-batch)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer (the references are under 50 tokens)")
    args = parser.parse_args()
    if not (args.adapter / "adapter_config.json").is_file():
        sys.exit(f"no adapter in {args.adapter}: run `make demo` first, or give --adapter DIR")

    sys.path.insert(0, str(ROOT))
    from bench.common import write_table
    from lorakit.data.records import read_records
    from lorakit.data.tokenize import reference_text
    from lorakit.evaluation.evaluate import matches

    records = {split: read_records(ROOT / "data" / "orders" / f"{split}.jsonl") for split in SPLITS}
    results = {}
    for dtype in DTYPES:
        results[dtype] = answers_in(dtype, args.adapter, records, args.batch, args.max_tokens)
        print(f"{dtype}: " + ", ".join(f"{s} {v:.0f} tok/s" for s, v in results[dtype][1].items()), flush=True)

    rows = []
    for split in SPLITS:
        references = [reference_text(r) for r in records[split]]
        exact = {d: sum(map(matches, results[d][0][split], references)) for d in DTYPES}
        same = sum(a == b for a, b in zip(*(results[d][0][split] for d in DTYPES), strict=True))
        n = len(references)
        speed = {d: results[d][1][split] for d in DTYPES}
        rows.append([f"{split} ({n} prompts)", f"{exact['float32']}/{n}", f"{exact['bfloat16']}/{n}",
                     f"{same}/{n}", f"{speed['float32']:.0f}", f"{speed['bfloat16']:.0f}",
                     f"**{speed['bfloat16'] / speed['float32']:.2f}x**"])
    name = "serve_precision_" + ("cuda" if torch.cuda.is_available() else "cpu")
    path = write_table(
        name, f"A trained adapter served in float32 and in bfloat16 ({args.adapter.name}, SmolLM2-135M-Instruct)",
        "python bench/serve_precision.py" + (f" --batch {args.batch}" if args.batch != 32 else ""),
        ["split", "exact match, float32", "exact match, bfloat16", "same answer text", "float32 tok/s",
         "bfloat16 tok/s", "bfloat16 / float32"], rows,
        f"Engine.generate, greedy, at most {args.max_tokens} new tokens, all requests on the adapter, {args.batch} "
        "decoded together; throughput is every generated token (prompt passes included) over the split's wall time, "
        "one run each, so it moves with this shared machine's speed. Exact match as `lorakit eval` counts it "
        "(parsed JSON objects equal), but free decoding: no --copy-fields constraint.")
    print(path.read_text())


if __name__ == "__main__":
    main()
