"""Serving many adapters: decode throughput of one batch of 16 requests on 16 different adapters.

Ways to decode the same 16 prompts (orders test messages in SmolLM2's chat template) for the
same number of tokens, greedy, on the embedded SmolLM2-135M-Instruct:
- lorakit, mixed: the serving engine, each request on its own adapter (rows grouped by adapter);
- PEFT, mixed: ``generate(..., adapter_names=[...])``, PEFT's mixed-adapter batch;
- lorakit, one adapter: the engine with all 16 requests on the same adapter;
- the same with the base weights unpacked: the engine multiplies with F.linear (MKL) instead of
  its packed oneDNN copy of the float32 weights (``--no-packed-weights``; models/packed_weights.py).
The adapters are 16 random adapters (r=16 unless --rank) on all linear layers. ``--dtype bfloat16``
puts both base models in bfloat16 (as ``lorakit serve --dtype bfloat16`` does); the adapters stay
float32 on both sides (PEFT casts the input to the adapter's dtype, lorakit computes the LoRA term in
the adapter's float32), so the comparison stays like for like. Decode throughput is the tokens
of steps 2..N over their time: each configuration runs once for 1 new token (prompt pass) and once
for N, alternating between configurations within each trial, and the difference is decoding.
Ratios are the median over trials of each trial's ratio of two runs made one after the other.
Also the time to load one adapter from its files into the running model, lorakit vs PEFT. Both
run in this process under the allocator policy of ``lorakit serve`` (freed memory kept, large
tensors on transparent huge pages: src/lorakit/process_memory.py).

    python bench/serve.py [--trials 7] [--tokens 65] [--device cpu] [--rank 16] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import write_table

ADAPTERS = 16


def make_adapters(directory: Path, base: str, rank: int) -> list[Path]:
    """16 random adapters of rank ``rank`` on all linear layers, saved in PEFT's format."""
    import lorakit
    from lorakit.core.walk import lora_layers
    from lorakit.models.base import load_base

    model, _ = load_base(base)
    paths = []
    for i in range(ADAPTERS):
        name = f"tenant{i}"
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (layer.lora[name].lora_A, layer.lora[name].lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(lorakit.save_adapter(model, directory / name, name=name))
    return paths


def prompts(tokenizer) -> list[list[int]]:
    from lorakit.data.records import read_records
    from lorakit.data.tokenize import prompt_text

    records = read_records(ROOT / "data" / "orders" / "test.jsonl")[:ADAPTERS]
    return [tokenizer(prompt_text(r, tokenizer), add_special_tokens=False)["input_ids"] for r in records]


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=65, help="new tokens per request (the first is the prompt pass)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--rank", type=int, default=16, help="rank of the 16 adapters")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the base models' dtype, on both sides (adapters stay float32)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    from lorakit.process_memory import keep_freed_memory
    keep_freed_memory()  # the allocator policy `lorakit serve` runs under, before the first large tensor

    from peft import PeftModel

    from lorakit.models.base import load_base
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.sampling import SamplingParams

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    paths = make_adapters(work, args.base, args.rank)
    names = [p.name for p in paths]

    def serving_engine(packed_weights: bool = True) -> tuple[Engine, AdapterRegistry, object]:
        """An engine over a fresh copy of the base model, with its adapter registry, as the command runs it."""
        model, tokenizer = load_base(args.base)
        registry = AdapterRegistry(model.to(device, dtype).eval())
        engine = Engine(model, tokenizer, max_batch=ADAPTERS, prepare=registry.acquire, release=registry.release,
                        packed_weights=packed_weights)
        engine.eos_ids = set()  # every request decodes exactly the asked number of tokens
        return engine, registry, tokenizer

    engine, registry, tokenizer = serving_engine()
    lorakit_load = [registry.register(n, p).load_ms for n, p in zip(names, paths, strict=True)]

    theirs, _ = load_base(args.base)
    theirs = theirs.to(device, dtype).eval()
    # No end-of-sequence token either: both pick the plain argmax for exactly N tokens (PEFT's
    # min_new_tokens would instead forbid the end token, where lorakit's engine may pick it).
    theirs.generation_config.eos_token_id = None
    peft_load = []
    start = time.perf_counter()
    peft = PeftModel.from_pretrained(theirs, paths[0], adapter_name=names[0]).eval()
    peft_load.append(time.perf_counter() - start)
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_load.append(timed(lambda n=name, p=path: peft.load_adapter(p, adapter_name=n)))

    batch = prompts(tokenizer)
    width = max(len(p) for p in batch)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)

    def lorakit_run(adapters, n, on=engine):
        return on.generate(batch, adapters, SamplingParams(max_tokens=n, temperature=0))

    def peft_run(n):
        with torch.inference_mode():
            out = peft.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=n,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[:, width:].tolist()

    mixed, peft_mixed, single = ("lorakit, 16 adapters mixed", "PEFT, 16 adapters mixed (adapter_names)",
                                 "lorakit, 16 requests on one adapter")
    unpacked = "lorakit, 16 requests on one adapter, weights not packed (--no-packed-weights)"
    configs = {  # run in this order, then reversed: lorakit mixed always runs next to each of the others
        peft_mixed: peft_run,
        mixed: lambda n: lorakit_run(names, n),
        single: lambda n: lorakit_run([names[0]] * ADAPTERS, n),
    }
    if engine.packed.nbytes:  # packing applies (a float32 base on a CPU with oneDNN): the same on a copy without
        plain_engine, plain_registry, _ = serving_engine(packed_weights=False)
        plain_registry.register(names[0], paths[0])
        configs[unpacked] = lambda n: lorakit_run([names[0]] * ADAPTERS, n, on=plain_engine)
    for run in configs.values():  # warm-up
        run(2)
    decode = {name: [] for name in configs}
    for trial in range(args.trials):
        order = list(configs) if trial % 2 == 0 else list(configs)[::-1]
        for name in order:
            prompt_pass = timed(lambda r=configs[name]: r(1))
            whole = timed(lambda r=configs[name]: r(args.tokens))
            decode[name].append(ADAPTERS * (args.tokens - 1) / (whole - prompt_pass))
            print(f"trial {trial + 1}/{args.trials} {name}: {decode[name][-1]:.0f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(lorakit_run(names, args.tokens), peft_run(args.tokens), strict=True))

    def ratios(numerator: str, denominator: str) -> list[float]:
        """Each trial's ratio of two runs made one after the other: the machine's slow and fast
        spells (it is shared) hit both alike, where they would move a ratio of medians."""
        return [n / d for n, d in zip(decode[numerator], decode[denominator], strict=True)]

    versus_peft, versus_single = ratios(mixed, peft_mixed), ratios(mixed, single)
    rows = [[name, f"{statistics.median(decode[name]):,.0f}"] for name in configs]
    rows += [["**lorakit mixed / PEFT mixed**", f"**{statistics.median(versus_peft):.2f}x**"],
             ["**lorakit mixed / lorakit one adapter**", f"**{statistics.median(versus_single):.2f}x**"]]
    if unpacked in configs:
        rows.append(["**lorakit one adapter, packed / not packed weights**",
                     f"**{statistics.median(ratios(single, unpacked)):.2f}x**"])
    rows += [[f"adapter load (r={args.rank}, all linear), lorakit", f"{statistics.median(lorakit_load):.0f} ms"],
             [f"adapter load (r={args.rank}, all linear), PEFT load_adapter",
              f"{1000 * statistics.median(peft_load[1:]):.0f} ms"]]
    suffix = ("" if args.rank == 16 else f"_r{args.rank}") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    path = write_table(
        f"serve_{args.device}{suffix}", f"Serving 16 adapters of rank {args.rank} in one batch ({args.base}, {args.device}, {args.dtype} base)",
        f"python bench/serve.py --trials {args.trials} --tokens {args.tokens} --device {args.device} --rank {args.rank}"
        + ("" if args.dtype == "float32" else f" --dtype {args.dtype}"),
        ["configuration", "decode tokens/s (median)"], rows,
        notes=f"16 requests (orders test prompts, chat template), greedy, {args.tokens} new tokens each; decode "
              f"throughput excludes the prompt pass; {args.trials} trials, order reversed every other one. Ratios: median "
              f"of each trial's ratio of two runs made one after the other (mixed / one adapter ranged "
              f"{min(versus_single):.2f}x to {max(versus_single):.2f}x). Greedy tokens identical between "
              f"lorakit and PEFT for {same}/{ADAPTERS} requests. lorakit's engine multiplies by a packed oneDNN copy of the "
              f"float32 base weights where it can (PEFT, and the 'not packed' row, by the weights themselves through "
              f"F.linear). Load time: median over the 16 adapters. Both in "
              "one process under `lorakit serve`'s allocator policy (freed memory kept: src/lorakit/process_memory.py).")
    print(path.read_text())


if __name__ == "__main__":
    main()
