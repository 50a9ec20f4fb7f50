"""QA-LoRA on a 4-bit base against LoRA on the float base: memory, training step, inference.

Measurements on the real SmolLM2-135M-Instruct (its linear layers read straight from the
embedded GGUF's Q4_1 blocks: 4 bits, groups of 32):
1. memory of the linear weights, group-wise quantized (2/3/4/8 bits) vs float32;
2. a training step (r=16, alpha=32, all linear layers, same batches of orders examples, AdamW):
   QA-LoRA on the 4-bit base (training computes on the exact de-quantizing path) vs LoRA on the
   float32 base, step time and peak memory above the loaded model; one child process per
   measurement, the two alternating, so noise hits both alike;
3. greedy decoding speed (32 new tokens, batch 1 and batch 16) of the 4-bit model with a QA-LoRA
   adapter merged (still 4-bit) with the kernels, with PyTorch's bfloat16 int4 kernel alone (as
   before lorakit's float32 kernels) and on the de-quantizing path, the same unmerged, and the
   float32 model with a LoRA adapter merged; float32 Linear weights packed for oneDNN as lorakit's
   generate and eval run them, and the float32 model also without;
4. with --parity-adapter DIR (a QA-LoRA adapter trained on orders): its merged model's greedy answers
   to data/orders/test.jsonl with the kernels (in batches of 32, and one prompt at a time) against
   the de-quantizing path.

    python bench/qalora.py [--trials 3] [--steps 4] [--batch 8] [--device cpu] [--parity-adapter DIR]
    python bench/qalora.py --compute-dtype bfloat16
    python bench/qalora.py --decode-only [--parity-adapter DIR]
    python bench/qalora.py --train-only

Writes bench/results/qalora_<device>.md. ``--compute-dtype bfloat16`` measures the training step only,
both sides' forward under the same bfloat16 autocast (``lorakit train``'s ``compute_dtype``); writes
qalora_<device>_bfloat16.md; ``--train-only`` measures 2 alone, in float32, and writes
qalora_<device>_float32.md. ``--decode-only`` measures 3 and 4 only, naming the CPU's instruction
set; writes qalora_<device>_decode.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import PeakMemory, alternate_workers, write_table

VARIANTS = ("qalora", "lora")
DATA = ROOT / "data" / "orders" / "train.jsonl"
TEST = ROOT / "data" / "orders" / "test.jsonl"
PROMPT = "Order: two large pepperoni pizzas and a cola, to 5 Oak Road."


def _model(variant: str, device: torch.device):
    """SmolLM2 with a fresh r=16 adapter on every linear layer: QA-LoRA on the 4-bit base, or LoRA on float32."""
    import lorakit
    from lorakit.models.base import load_base
    from lorakit.models.quantized import QuantSpec

    torch.manual_seed(0)
    model, tokenizer = load_base(quant=QuantSpec(4, 32) if variant == "qalora" else None)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    return model.to(device), tokenizer


def train_worker(variant: str, args: argparse.Namespace) -> dict:
    import lorakit
    from lorakit.data.batches import collate, epoch_batches
    from lorakit.data.tokenize import tokenize_file
    from lorakit.models.autocast_weights import frozen_weights_in
    from lorakit.train.loss import loss_sum
    from lorakit.train.precision import compute_context

    device = torch.device(args.device)
    compute = compute_context(args.compute_dtype, device)
    model, tokenizer = _model(variant, device)
    examples = tokenize_file(DATA, tokenizer, max_length=256)
    rows = epoch_batches([len(e) for e in examples], args.batch, seed=0, epoch=0)[: args.steps + 1]
    batches = [collate([examples[i] for i in r], tokenizer.pad_token_id).to(device) for r in rows]
    lorakit.mark_only_lora_as_trainable(model)
    params = list(lorakit.lora_parameters(model))
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch) -> None:
        with compute(batch.input_ids.shape[1]):
            loss = loss_sum(model, batch) / batch.loss_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # As lorakit train runs: frozen float32 Linear weights held in the compute dtype (LoRA's base; the
    # 4-bit layers are not nn.Linear), the copies counted in the peak memory.
    with frozen_weights_in(model, getattr(torch, args.compute_dtype)) as held_bytes:
        step(batches[0])  # warm-up, untimed: also creates AdamW's state
        times = []
        for batch in batches[1:]:
            _sync(device)
            start = time.perf_counter()
            step(batch)
            _sync(device)
            times.append(time.perf_counter() - start)
        with PeakMemory(device) as memory:
            step(max(batches[1:], key=lambda b: b.input_ids.numel()))
    tokens = sum(int(b.attention_mask.sum()) for b in batches[1:])
    return {"times": times, "peak": memory.peak + held_bytes, "tokens": tokens,
            "trainable": sum(p.numel() for p in params)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def linear_memory() -> list[list[str]]:
    """Bytes of the quantized linear weights per spec, against float32 (the output head excluded)."""
    from lorakit.models.base import load_base
    from lorakit.models.quantized import QuantSpec
    from lorakit.quant.linear import QuantLinear

    rows = []
    for bits, group in ((4, 32), (4, 64), (3, 32), (2, 32), (8, 32)):
        model, _ = load_base(quant=QuantSpec(bits, group))
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        packed = sum(m.quantized.nbytes for m in layers)
        dense = sum(4 * m.in_features * m.out_features for m in layers)
        source = " (GGUF Q4_1 blocks as they are)" if (bits, group) == (4, 32) else ""
        rows.append([f"{bits}-bit, groups of {group}{source}", f"{packed / 2**20:.1f} MiB", f"{dense / 2**20:.1f} MiB",
                     f"**{packed / dense:.3f}x**"])
    return rows


def decode_times(device: torch.device, runs: int, batch: int, new_tokens: int) -> dict[str, list[float]]:
    """Seconds for ``new_tokens`` greedy tokens of ``batch`` rows, run by run, for the inference
    variants: each run times every variant once, one after the other."""
    import lorakit
    from lorakit.generation.prompts import chat_prompt
    from lorakit.models.packed_weights import PackedLinearWeights
    from lorakit.quant.linear import use_int4_kernel

    qalora, tokenizer = _model("qalora", device)
    lora, _ = _model("lora", device)
    with torch.no_grad():  # non-zero adapters (fresh ones have B = 0)
        for param in [*lorakit.lora_parameters(qalora), *lorakit.lora_parameters(lora)]:
            param.normal_(0, 0.01)
    merged_4bit = lorakit.merge_and_unload(copy.deepcopy(qalora)).eval()  # the same adapter, in the mins
    merged_exact = use_int4_kernel(copy.deepcopy(merged_4bit), False)
    qalora.eval()
    lorakit.merge(lora.eval())
    variants = {KERNEL: merged_4bit, EXACT: merged_exact, "4-bit + QA-LoRA unmerged, kernels": qalora,
                FLOAT: lora, FLOAT_UNPACKED: copy.deepcopy(lora)}
    variants[BFLOAT16_KERNEL] = _bfloat16_kernel_only(copy.deepcopy(merged_4bit))
    for name, model in variants.items():  # float32 Linears packed, as lorakit's generate and eval run them
        if name != FLOAT_UNPACKED:
            PackedLinearWeights(model)
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": PROMPT}])
    ids = tokenizer([prompt] * batch, return_tensors="pt").input_ids.to(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for run in range(-1, runs):  # run -1 warms up, untimed (the kernels' forms are made on first use)
            for name, model in variants.items():
                tokens = new_tokens if run >= 0 else 2
                _sync(device)
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                _sync(device)
                if run >= 0:
                    times[name].append(time.perf_counter() - start)
    return times


KERNEL = "4-bit, QA-LoRA merged, kernels"
# PyTorch's bfloat16 int4 kernel for every row count it pays at, without lorakit's float32 product kernels (as
# before 2026-12-03, except that longer inputs de-quantize in one pass, as in every variant).
BFLOAT16_KERNEL = "4-bit, QA-LoRA merged, bfloat16 int4 kernel only"
EXACT = "4-bit, QA-LoRA merged, de-quantizing path"
FLOAT = "float32 + LoRA, merged"
# The float32 model as it ran before lorakit packed float32 weights for oneDNN (2026-12-03): F.linear.
FLOAT_UNPACKED = "float32 + LoRA, merged, weights not packed (F.linear)"


def _bfloat16_kernel_only(model: torch.nn.Module) -> torch.nn.Module:
    from lorakit.quant.int8_head import Int8GridHead
    from lorakit.quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_float32_kernels = False
        elif isinstance(module, Int8GridHead):
            module.use_kernel = False  # the float head, as before lorakit's 8-bit head product
    return model


def answer_parity(adapter: Path) -> dict:
    """Greedy answers of ``adapter`` merged into its 4-bit base, on the orders test split: with the
    kernels in batches of 32 (the few-row float32 kernel decodes), one prompt at a time (the one-row
    kernel decodes), and on the exact path in batches of 32."""
    import lorakit
    from lorakit.data.records import read_records
    from lorakit.evaluation.evaluate import score_model
    from lorakit.models.base import load_for_inference
    from lorakit.quant.linear import use_int4_kernel

    model, tokenizer = load_for_inference(None, adapter)
    model = lorakit.merge_and_unload(model)
    records = read_records(TEST)
    kernel = score_model(model, tokenizer, records, "kernels", batch_size=32, progress=True)
    single = score_model(model, tokenizer, records, "one-row kernel", batch_size=1, progress=True)
    exact = score_model(use_int4_kernel(model, False), tokenizer, records, "exact", batch_size=32, progress=True)
    return {"n": len(records), "exact": exact.exact_match,
            **{name: {"same": sum(a == b for a, b in zip(run.answers, exact.answers, strict=True)),
                      "exact_match": run.exact_match} for name, run in (("kernel", kernel), ("single", single))}}


def _step_row(train: dict, label: str) -> list[str]:
    f, q = train["lora"], train["qalora"]
    return [label, f"{q['step'] * 1000:.0f} ms, {q['tokens_per_s']:,.0f} tok/s, peak +{q['peak'] / 2**20:.0f} MiB",
            f"LoRA on float32: {f['step'] * 1000:.0f} ms, {f['tokens_per_s']:,.0f} tok/s, peak +{f['peak'] / 2**20:.0f} MiB",
            f"time **{q['step'] / f['step']:.2f}x**, memory **{q['peak'] / f['peak']:.2f}x**"]


def write_steps(train: dict, args: argparse.Namespace) -> None:
    """The training step alone, QA-LoRA against LoRA: under bfloat16 autocast, or with --train-only in
    float32."""
    half = args.compute_dtype != "float32"
    command = (f"python bench/qalora.py --trials {args.trials} --steps {args.steps} --batch {args.batch} "
               f"--device {args.device} " + (f"--compute-dtype {args.compute_dtype}" if half else "--train-only"))
    isa = torch.backends.cpu.get_cpu_capability() if args.device == "cpu" else args.device
    products = f"{args.compute_dtype} products under autocast" if half else "float32"
    how = (f"forward under the same {args.compute_dtype} autocast on both sides (adapters float32), backward "
           "outside it" if half else "float32 throughout")
    path = write_table(
        f"qalora_{args.device}_{args.compute_dtype}",
        f"QA-LoRA on a 4-bit base vs LoRA on float32, {products} (SmolLM2-135M-Instruct, {args.device}, {isa})",
        command, ["measured", "value", "compared with", "ratio"],
        [_step_row(train, "training step, QA-LoRA on the 4-bit base")],
        notes=f"Batches of {args.batch} orders examples, {how}, AdamW; {args.trials} alternating child "
              f"processes x {args.steps} steps, the median step. QA-LoRA de-quantizes the 4-bit weights in "
              "forward and again in backward (on a CPU with AVX2, 4-bit weights in one pass by lorakit's kernel, "
              "quant/int4_float32.c, the same values as PyTorch's). "
              + ("LoRA's float32 base is held in bfloat16 for the run, as lorakit train holds it (its memory "
                 "counts those copies). " if half else "")
              + "Both in the allocator policy of the lorakit command (freed memory kept: "
              "src/lorakit/process_memory.py).",
    )
    print(path.read_text())


def inference_rows(args: argparse.Namespace) -> list[list[str]]:
    """Decoding speeds at batch 1 and 16 against the float32 model, and with --parity-adapter its answers."""
    rows = []
    tokens = 32
    for batch in (1, 16):
        times = decode_times(torch.device(args.device), args.trials, batch, tokens)
        float_speed = batch * tokens / min(times[FLOAT])
        for name, seconds in times.items():
            if name != FLOAT:
                # The ratio run by run (each run times every variant within seconds of the others), then
                # the median: on a shared machine whose speed drifts, steadier than a ratio of two bests.
                ratio = statistics.median(f / s for f, s in zip(times[FLOAT], seconds, strict=True))
                rows.append([f"greedy decoding, batch {batch}: {name}", f"{batch * tokens / min(seconds):.1f} tok/s",
                             f"{FLOAT}: {float_speed:.1f} tok/s", f"**{ratio:.2f}x**"])
    if args.parity_adapter is not None:
        parity = answer_parity(args.parity_adapter)
        n = parity["n"]
        for name, label in (("kernel", "kernels, batches of 32"), ("single", "kernels, one prompt at a time")):
            rows.append([(f"greedy answers to the {n} orders test prompts, {args.parity_adapter} merged: "
                          f"{label} vs de-quantizing path"), f"same answer on {parity[name]['same']} of {n}",
                         f"exact match: {parity[name]['exact_match']:.1%}, de-quantizing {parity['exact']:.1%}",
                         f"**{parity[name]['same'] / n:.3f}**"])
    return rows


def write_inference(args: argparse.Namespace) -> None:
    """--decode-only: the inference rows alone, with the CPU's instruction set named."""
    from lorakit.hardware import native_bfloat16

    device = torch.device(args.device)
    command = f"python bench/qalora.py --decode-only --trials {args.trials} --device {args.device}"
    if args.parity_adapter is not None:
        command += f" --parity-adapter {args.parity_adapter}"
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    path = write_table(
        f"qalora_{args.device}_decode", f"4-bit merged QA-LoRA model vs float32, inference ({args.device}, {isa})",
        command, ["measured", "value", "compared with", "ratio"], inference_rows(args),
        notes=f"PyTorch's CPU capability: {isa}; bfloat16 multiplied in hardware: "
              f"{'yes' if native_bfloat16(device) else 'no (emulated)'}. 'Kernels': lorakit's float32 kernels "
              "(quant/int4_float32.c, where they are built) multiply up to int4_float32.FLOAT32_MAX_ROWS rows of "
              "input straight from the codes (one row by the one-row kernel; where bfloat16 is multiplied in "
              "hardware, one row only, PyTorch's int4 kernel taking 2 and more), and the output head, exactly on "
              "GGUF's 8-bit grid, up to int8_head.HEAD_MAX_ROWS rows from its 8-bit codes (quant/int8_float32.c); "
              "longer inputs take PyTorch's int4 "
              "kernel where it pays (bfloat16 x, float32 accumulation; where bfloat16 is emulated, only up to "
              "int4_kernel.EMULATED_BFLOAT16_MAX_ROWS rows) or de-quantize (4-bit weights in one pass by lorakit's "
              "kernel where it is built, the same values as PyTorch's, in every variant). The row 'bfloat16 int4 "
              "kernel only' is the model without lorakit's product kernels (its head multiplied as floats), as before "
              "2026-12-03 but for that de-quantization. The parity rows compare answers with "
              "the de-quantizing path in batches of 32. Float32 Linear weights are packed for oneDNN (all of the "
              "float32 model's; of the 4-bit models, the output head where it is multiplied as floats) as "
              "lorakit's generate, eval and serve run them (models/packed_weights.py), except in the row 'not "
              "packed'. All in the allocator policy of the lorakit commands (freed memory kept: "
              "src/lorakit/process_memory.py). Decoding: the same short prompt, 32 new tokens, prompt pass "
              f"included, after a short untimed run; {args.trials} runs, each timing every variant once in turn; "
              "tokens/s is each variant's best run, the ratio the median over runs of the float32 model's time "
              "over the variant's in the same run; batch 16 is 16 copies of the prompt.",
    )
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="training child processes per variant, alternating")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per child, after one warm-up")
    parser.add_argument("--batch", type=int, default=8, help="examples per training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parity-adapter", type=Path, help="a QA-LoRA adapter trained on orders (configs/"
                        "smollm2-orders-qalora.yaml): compare its merged answers, int4 kernel vs exact path")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the training forward's matrix products, on both sides (autocast); bfloat16 measures "
                        "the training step only")
    parser.add_argument("--train-only", action="store_true",
                        help="the training step alone, float32: qalora_<device>_float32.md")
    parser.add_argument("--decode-only", action="store_true",
                        help="inference alone (decoding speeds; answers with --parity-adapter): qalora_<device>_decode.md")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_only or args.worker:
        from lorakit.process_memory import keep_freed_memory

        # Every variant in the allocator policy the lorakit commands run in (train, eval, generate):
        # de-quantizing allocates every layer's weight at every forward, which glibc's default may
        # hand back and fault in again.
        keep_freed_memory()
    if args.decode_only:
        write_inference(args)
        return
    if args.worker:
        print(json.dumps(train_worker(args.worker, args)))
        return

    results = alternate_workers(__file__, VARIANTS, args.trials,
                                ["--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device,
                                 "--compute-dtype", args.compute_dtype])
    train = {}
    for variant, runs in results.items():
        step = statistics.median(t for r in runs for t in r["times"])
        train[variant] = {"step": step, "peak": statistics.median(r["peak"] for r in runs),
                          "tokens_per_s": runs[0]["tokens"] / args.steps / step, "trainable": runs[0]["trainable"]}
    if args.compute_dtype != "float32" or args.train_only:
        write_steps(train, args)
        return
    memory = linear_memory()
    rows = [[f"linear weights, {spec}", packed, f"float32: {dense}", ratio] for spec, packed, dense, ratio in memory]
    rows.append(_step_row(train, "training step, QA-LoRA on the 4-bit base"))
    rows += inference_rows(args)
    command = f"python bench/qalora.py --trials {args.trials} --steps {args.steps} --batch {args.batch} --device {args.device}"
    if args.parity_adapter is not None:
        command += f" --parity-adapter {args.parity_adapter}"
    path = write_table(
        f"qalora_{args.device}", f"QA-LoRA on a 4-bit base vs LoRA on float32 (SmolLM2-135M-Instruct, {args.device})",
        command, ["measured", "value", "compared with", "ratio"], rows,
        notes="Quantized sizes count packed codes plus float16 scales and mins. Training: batches of "
              f"{args.batch} orders examples, forward + backward + AdamW, {args.trials} alternating child processes x "
              f"{args.steps} steps; QA-LoRA trains {train['qalora']['trainable']:,} adapter parameters (its A is "
              f"(r, in/32)), LoRA {train['lora']['trainable']:,}. Training de-quantizes the 4-bit weights in forward and again in "
              "backward (float32, exact); both variants in the lorakit command's allocator policy (freed memory "
              "kept: src/lorakit/process_memory.py). Inference: up to 128 rows of input with lorakit's float32 "
              "kernels (quant/int4_float32.c), more with PyTorch's int4 kernel, which computes x W^T from the "
              "packed codes in bfloat16 (activations rounded to bfloat16, float32 accumulation), where it pays; the "
              "de-quantizing path is the exact float32 reference. "
              f"Decoding: after a short untimed run, {args.trials} runs, each timing every variant once in turn; "
              "tokens/s is each variant's best run, the ratio the median over runs of the float32 model's time "
              "over the variant's in the same run; batch 16 is 16 copies of one prompt.",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
