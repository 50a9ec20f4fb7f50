"""Supervised fine-tuning step, lorakit vs PEFT: the real SmolLM2-135M-Instruct on the orders task.

Same model (the embedded SmolLM2 weights), same batches (orders training examples in SmolLM2's
chat template, loss on the assistant tokens only, length-bucketed batches of --batch), same LoRA
settings (r=16, alpha=32, all linear layers), same AdamW. lorakit's step is `lorakit train`'s:
the output head only where a token carries loss, the prefix all rows share run once per batch, and
under bfloat16 on a CPU the plain attention kernel for short batches. PEFT's is the standard one:
`model(input_ids, attention_mask, labels).loss`. Both minimise the same mean loss per target token.

Steps are timed first, then peak memory is read over one more step (the longest batch). Each
measurement is one child process (so peak memory is that library's alone), the libraries
alternating in one run so machine noise hits both alike. Reports median step time and peak memory
in use above the loaded model, as lorakit / PEFT ratios; writes bench/results/train_step.md.

    python bench/train_step.py [--trials 3] [--steps 4] [--batch 8] [--device cpu] [--compute-dtype bfloat16]

``--compute-dtype bfloat16`` runs both sides' forward under the same autocast (``lorakit train``'s
``compute_dtype``; for PEFT, the mixed precision its docs recommend): matrix products in bfloat16,
weights and adapters in float32, backward outside autocast; writes train_step_<device>_bfloat16.md.

``--kept-memory`` runs both sides in the allocator policy of the ``lorakit`` command (freed memory
kept for reuse, src/lorakit/process_memory.py) instead of glibc's default; writes
train_step_<device>[_bfloat16]_kept.md.

With --dora: DoRA's cost, three workers in one run: lorakit's plain LoRA, lorakit's DoRA and PEFT's
DoRA (same settings plus use_dora); writes bench/results/train_step_dora_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import PeakMemory, alternate_workers, write_table

LIBRARIES = ("lorakit", "peft")
DORA_WORKERS = ("lorakit", "lorakit-dora", "peft-dora")
DATA = ROOT / "data" / "orders" / "train.jsonl"


def worker(library: str, args: argparse.Namespace) -> dict:
    from lorakit.data.batches import collate, epoch_batches
    from lorakit.data.tokenize import tokenize_file
    from lorakit.models.autocast_weights import frozen_weights_in
    from lorakit.models.base import load_base
    from lorakit.train.precision import compute_context

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer = load_base(args.base)
    model = model.to(device)
    examples = tokenize_file(DATA, tokenizer, max_length=256)
    rows = epoch_batches([len(e) for e in examples], args.batch, seed=0, epoch=0)[: args.steps + 1]
    batches = [collate([examples[i] for i in r], tokenizer.pad_token_id).to(device) for r in rows]

    dora = library.endswith("-dora")
    if library.startswith("lorakit"):
        import lorakit
        from lorakit.train.loss import loss_sum

        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=dora))
        lorakit.mark_only_lora_as_trainable(model)
        params = list(lorakit.lora_parameters(model))

        def loss_of(batch):
            return loss_sum(model, batch) / batch.loss_tokens
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 use_dora=dora))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_of(batch):
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    model.config.use_cache = False
    model.train()
    compute = compute_context(args.compute_dtype, device)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch) -> float:
        # lorakit train's context also picks the attention kernel by key length (train/precision.py);
        # PEFT's documented mixed precision is autocast alone.
        with compute(batch.input_ids.shape[1] if library.startswith("lorakit") else 0):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # lorakit train holds the frozen base weights in the compute dtype for its run
    # (models/autocast_weights.py), beside the float32 ones: counted in its peak memory. PEFT's are
    # cast by autocast at every use.
    held = getattr(torch, args.compute_dtype) if library.startswith("lorakit") else None
    with frozen_weights_in(model, held) as held_bytes:
        times = []
        first_loss = step(batches[0])  # warm-up, untimed: the first step also creates AdamW's state
        for batch in batches[1:]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        # Memory in a step of its own: on CPU, PeakMemory polls malloc's counters from a thread, which
        # contends for the allocator and would slow the timed steps.
        with PeakMemory(device) as memory:
            step(max(batches[1:], key=lambda b: b.input_ids.numel()))
    tokens = sum(int(b.attention_mask.sum()) for b in batches[1:])
    return {"times": times, "first_loss": first_loss, "peak": memory.peak + held_bytes, "tokens": tokens,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="child processes per library, alternating")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per child, after one warm-up step")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", default="smollm2", help="base model (default: the embedded SmolLM2)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the forward's matrix products, on both sides (autocast)")
    parser.add_argument("--dora", action="store_true", help="DoRA's step: lorakit LoRA, lorakit DoRA, PEFT DoRA")
    parser.add_argument("--kept-memory", action="store_true",
                        help="both sides in the lorakit command's allocator policy (freed memory kept)")
    parser.add_argument("--worker", choices=LIBRARIES + DORA_WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dora and (args.compute_dtype != "float32" or args.kept_memory) and not args.worker:
        parser.error("--dora measures float32 steps in glibc's default policy only; leave out --compute-dtype "
                     "and --kept-memory")
    if args.worker:
        if args.kept_memory:
            from lorakit.process_memory import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(worker(args.worker, args)))
        return

    results = alternate_workers(__file__, DORA_WORKERS if args.dora else LIBRARIES, args.trials,
                                ["--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device,
                                 "--base", args.base, "--compute-dtype", args.compute_dtype]
                                + (["--kept-memory"] if args.kept_memory else []))
    if args.dora:
        return dora_report(results, args)

    summary = {}
    for lib, runs in results.items():
        step = statistics.median(t for r in runs for t in r["times"])
        summary[lib] = {"step": step, "peak": statistics.median(r["peak"] for r in runs),
                        "tokens_per_s": runs[0]["tokens"] / args.steps / step, "trainable": runs[0]["trainable"],
                        "first_loss": runs[0]["first_loss"]}
    ours, theirs = summary["lorakit"], summary["peft"]
    assert ours["trainable"] == theirs["trainable"], "the two libraries must train the same parameters"
    # Same objective, weights and batch: the first loss must agree up to float rounding, bfloat16's
    # (8 bits of mantissa, summed in another order) under autocast. (Later steps drift apart by
    # rounding amplified through training, more so on a GPU.)
    worst = abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])
    bound = 1e-4 if args.compute_dtype == "float32" else 1e-2
    assert worst < bound, f"lorakit and PEFT losses differ by {worst:.2e} (relative)"
    rows = [[lib, f"{s['step'] * 1000:.0f} ms", f"{s['tokens_per_s']:,.0f}", f"{s['peak'] / 2**20:.0f} MiB",
             f"{s['trainable']:,}"] for lib, s in summary.items()]
    rows.append(["**lorakit / PEFT**", f"**{ours['step'] / theirs['step']:.3f}x**", "",
                 f"**{ours['peak'] / theirs['peak']:.3f}x**", ""])
    bf16 = args.compute_dtype != "float32"
    command = (f"python bench/train_step.py --trials {args.trials} --steps {args.steps} --batch {args.batch} "
               f"--device {args.device}" + (f" --base {args.base}" if args.base != "smollm2" else "")
               + (f" --compute-dtype {args.compute_dtype}" if bf16 else "")
               + (" --kept-memory" if args.kept_memory else ""))
    model = "SmolLM2-135M-Instruct" if args.base == "smollm2" else Path(args.base).name
    path = write_table(
        f"train_step_{args.device}" + (f"_{args.compute_dtype}" if bf16 else "") + ("_kept" if args.kept_memory else ""),
        f"Fine-tuning step: lorakit vs PEFT ({model}, orders task, {args.device}"
        + (f", {args.compute_dtype} products under autocast" if bf16 else "") + ")", command,
        ["library", "median step", "tokens/s", "peak memory above model", "trainable params"], rows,
        notes=f"r=16, alpha=32, all linear layers; batches of {args.batch} orders examples (length-bucketed, loss on "
              f"assistant tokens only); forward + backward + AdamW step; {args.trials} alternating child processes x "
              f"{args.steps} steps each. First-step losses agree within {worst:.1e} relative."
              + (" lorakit holds the frozen linear weights in the compute dtype for the run, as lorakit train "
                 "does (its memory counts those copies); PEFT's are cast by autocast at every use." if bf16 else "")
              + (" Both sides in the lorakit command's allocator policy (freed memory kept for reuse: "
                 "src/lorakit/process_memory.py); without --kept-memory both run in glibc's default."
                 if args.kept_memory else " Both sides in glibc's default allocator policy."),
    )
    print(path.read_text())


def dora_report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    summary = {lib: {"step": statistics.median(t for r in runs for t in r["times"]),
                     "peak": statistics.median(r["peak"] for r in runs), "trainable": runs[0]["trainable"],
                     "first_loss": runs[0]["first_loss"], "tokens": runs[0]["tokens"]} for lib, runs in results.items()}
    ours, plain, theirs = summary["lorakit-dora"], summary["lorakit"], summary["peft-dora"]
    assert ours["trainable"] == theirs["trainable"], "the two DoRA implementations must train the same parameters"
    worst = abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])
    assert worst < 1e-4, f"lorakit and PEFT DoRA losses differ by {worst:.2e} (relative)"
    names = {"lorakit": "lorakit LoRA", "lorakit-dora": "lorakit DoRA", "peft-dora": "PEFT DoRA"}
    rows = [[names[lib], f"{s['step'] * 1000:.0f} ms", f"{s['tokens'] / args.steps / s['step']:,.0f}",
             f"{s['peak'] / 2**20:.0f} MiB", f"{s['trainable']:,}"] for lib, s in summary.items()]
    rows.append(["**lorakit DoRA / lorakit LoRA**", f"**{ours['step'] / plain['step']:.3f}x**", "",
                 f"**{ours['peak'] / plain['peak']:.3f}x**", ""])
    rows.append(["**lorakit DoRA / PEFT DoRA**", f"**{ours['step'] / theirs['step']:.3f}x**", "",
                 f"**{ours['peak'] / theirs['peak']:.3f}x**", ""])
    command = (f"python bench/train_step.py --dora --trials {args.trials} --steps {args.steps} --batch {args.batch} "
               f"--device {args.device}")
    path = write_table(
        f"train_step_dora_{args.device}", f"DoRA's fine-tuning step: lorakit vs PEFT, and against plain LoRA "
        f"(SmolLM2-135M-Instruct, orders task, {args.device})", command,
        ["worker", "median step", "tokens/s", "peak memory above model", "trainable params"], rows,
        notes=f"r=16, alpha=32, all linear layers, DoRA's magnitudes on top (PEFT's use_dora=True); batches of "
              f"{args.batch} orders examples; forward + backward + AdamW step; {args.trials} alternating child "
              f"processes x {args.steps} steps each. First-step DoRA losses agree within {worst:.1e} relative. "
              "Both DoRA implementations form s*B@A and the norm of W + s*B@A per layer every step (the norm "
              "treated as a constant in backward, as the paper and PEFT do).",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
