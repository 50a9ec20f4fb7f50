"""The serving engine's decoding against an earlier commit's, side by side in one run, and in bfloat16.

The same work on both sides: the embedded SmolLM2-135M-Instruct, 16 requests (orders test
prompts, chat template), greedy, N new tokens each, through `lorakit.serve.engine.Engine` with
no HTTP in between, in three configurations: every request on the base model, all 16 on one
adapter, each on its own adapter (16 random r=16 adapters on all linear layers, written once
by this tree and read by both). Decode throughput is the tokens of steps 2..N over their time
(a run of 1 token, the prompt pass, is subtracted). A fourth is continuous batching: 48 requests
(3 per adapter, of N, N/2, N/3 and N/4 tokens in turn) through 16 rows, so requests leave and
others join while decoding goes on; its throughput is every generated token over the whole time,
prompt passes included. Three sides: this tree in float32, the
earlier commit in float32 (the same work: what the code change did), and this tree with the model
in bfloat16 (`lorakit serve --dtype bfloat16`: other arithmetic, so its tokens are compared too).
Each side runs in its own child process, its `lorakit` imported from its own source tree (the
earlier commit checked out in a git worktree, which must have src/lorakit/process_memory.py), the
sides alternating trial by trial, each in `lorakit serve`'s allocator policy.

    python bench/serve_engine.py --against HEAD~1 [--trials 4] [--runs 3] [--tokens 65]

Writes bench/results/serve_engine_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("base model", "one adapter", "16 adapters mixed", "16 adapters, joining and leaving")
STEADY = CONFIGS[:3]
THIS, BF16 = "this tree, float32", "this tree, bfloat16"
ADAPTERS = 16


def worker(args: argparse.Namespace) -> dict:
    if args.tree is not None:  # this side's lorakit comes from that tree, not the installed one
        sys.path.insert(0, str(Path(args.tree) / "src"))
    from lorakit.process_memory import keep_freed_memory

    keep_freed_memory()  # `lorakit serve`'s allocator policy, before the first large tensor
    import torch

    import lorakit
    from lorakit.data.records import read_records
    from lorakit.data.tokenize import prompt_text
    from lorakit.models.base import load_base
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.sampling import SamplingParams

    assert Path(lorakit.__file__).is_relative_to(Path(args.tree or ROOT)), lorakit.__file__
    model, tokenizer = load_base(dtype=getattr(torch, args.dtype))
    model.eval()
    registry = AdapterRegistry(model)
    names = []
    for path in sorted(Path(args.adapters).iterdir()):
        registry.register(path.name, path)
        names.append(path.name)
    engine = Engine(model, tokenizer, max_batch=ADAPTERS, prepare=registry.acquire, release=registry.release)
    engine.eos_ids = set()  # every request decodes exactly the asked number of tokens
    records = read_records(ROOT / "data" / "orders" / "test.jsonl")[:ADAPTERS]
    prompts = [tokenizer(prompt_text(r, tokenizer), add_special_tokens=False)["input_ids"] for r in records]
    adapters = {"base model": [None] * ADAPTERS, "one adapter": [names[0]] * ADAPTERS, "16 adapters mixed": names}

    def run(config: str, tokens: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = engine.generate(prompts, adapters[config], SamplingParams(max_tokens=tokens, temperature=0))
        return time.perf_counter() - start, out

    def staggered() -> tuple[float, list[list[int]]]:
        """Continuous batching: 3 requests per adapter, of 1/1 to 1/4 of the tokens, through 16 rows,
        so requests leave and others join while decoding goes on (prompt passes included)."""
        lengths = [max(args.tokens // (1 + i % 4), 2) for i in range(3 * ADAPTERS)]
        start = time.perf_counter()
        requests = [engine.submit(Request(names[i % ADAPTERS], prompts[i % ADAPTERS],
                                          SamplingParams(max_tokens=n, temperature=0))) for i, n in enumerate(lengths)]
        while any(r.finish_reason is None for r in requests):
            engine.step()
        return sum(lengths) / (time.perf_counter() - start), [r.ids for r in requests]

    for config in STEADY:  # warm-up
        run(config, 2)
    speeds, tokens = {c: [] for c in CONFIGS}, {}
    for _ in range(args.runs):
        for config in STEADY:
            prompt_pass, _ = run(config, 1)
            whole, tokens[config] = run(config, args.tokens)
            speeds[config].append(ADAPTERS * (args.tokens - 1) / (whole - prompt_pass))
        speed, tokens[CONFIGS[3]] = staggered()
        speeds[CONFIGS[3]].append(speed)
    return {"speeds": speeds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="HEAD~1", help="the earlier commit (anything git rev-parse takes)")
    parser.add_argument("--trials", type=int, default=4, help="child processes per side, alternating")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration in each child")
    parser.add_argument("--tokens", type=int, default=65, help="new tokens per request (the first is the prompt pass)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(ROOT))
    from bench.common import write_table
    from bench.serve import make_adapters
    from lorakit.commands.serve import served_dtype

    commit = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lorakit-engine-bench-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            make_adapters(Path(tmp) / "adapters", "smollm2", 16)
            earlier = f"commit {commit}, float32"
            sides = {THIS: [], earlier: [], BF16: []}
            for trial in range(args.trials):
                for side in list(sides) if trial % 2 == 0 else list(sides)[::-1]:
                    cmd = [sys.executable, __file__, "--worker", "--adapters", str(Path(tmp) / "adapters"),
                           "--runs", str(args.runs), "--tokens", str(args.tokens)]
                    if side == earlier:
                        cmd += ["--tree", str(tree)]
                    if side == BF16:
                        cmd += ["--dtype", "bfloat16"]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    sides[side].append(json.loads(out.strip().splitlines()[-1]))
                    medians = {c: statistics.median(sides[side][-1]["speeds"][c]) for c in CONFIGS}
                    print(f"trial {trial + 1}/{args.trials} {side}: " + ", ".join(f"{c} {v:.0f} tok/s"
                                                                                 for c, v in medians.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)

    speed = {side: {c: statistics.median(s for r in runs for s in r["speeds"][c]) for c in CONFIGS}
             for side, runs in sides.items()}

    def ratio(side: str, config: str) -> float:
        """Median over trials of side / earlier, each trial's children having run one after the other."""
        return statistics.median(statistics.median(a["speeds"][config]) / statistics.median(b["speeds"][config])
                                 for a, b in zip(sides[side], sides[earlier], strict=True))

    def same(side: str, config: str) -> str:
        mine, theirs = sides[side][-1]["tokens"][config], sides[earlier][-1]["tokens"][config]
        return f"{sum(a == b for a, b in zip(mine, theirs, strict=True))}/{len(mine)}"

    rows = [[config, f"{speed[earlier][config]:,.0f}", f"{speed[THIS][config]:,.0f}", f"**{ratio(THIS, config):.2f}x**",
             same(THIS, config), f"{speed[BF16][config]:,.0f}", f"**{ratio(BF16, config):.2f}x**", same(BF16, config)]
            for config in CONFIGS]

    def mixed_vs_one(side: str) -> str:
        ratios = [statistics.median(r["speeds"]["16 adapters mixed"]) / statistics.median(r["speeds"]["one adapter"])
                  for r in sides[side]]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x to {max(ratios):.2f}x)"

    path = write_table(
        "serve_engine_cpu", f"Serving engine decode, this tree vs commit {commit} (SmolLM2-135M, CPU)",
        f"python bench/serve_engine.py --against {args.against} --trials {args.trials} --runs {args.runs} "
        f"--tokens {args.tokens}",
        ["requests on", f"{earlier} tok/s", "this tree, float32 tok/s", "vs earlier", "same tokens",
         "this tree, bfloat16 tok/s", "vs earlier", "same tokens"], rows,
        notes=f"Engine.generate, greedy, {args.tokens} new tokens per request, no end token; decode throughput "
              "excludes the prompt pass, except joining and leaving: 48 requests of 1/1 to 1/4 of those tokens "
              f"through 16 rows, every token over the whole run, prompt passes included. {args.trials} child processes per side, alternating, {args.runs} runs of "
              "each configuration in each; ratios are the median over trials of each side's median over the "
              "earlier commit's. Same tokens: requests whose tokens equal the earlier commit's. In this tree, "
              f"16 adapters mixed / one adapter: {mixed_vs_one(THIS)} in float32, {mixed_vs_one(BF16)} in bfloat16. "
              f"`lorakit serve`'s default on this machine (--dtype auto): {served_dtype('auto', False)}.")
    print(path.read_text())


if __name__ == "__main__":
    main()
