"""LoRA against its alternatives on the demo task, on this machine: `lorakit compare` on the demo
recipe (SmolLM2-135M-Instruct, the orders data, 120 steps for every method), its table and chart
kept in bench/results/ with the machine and date.

    python bench/compare.py [--methods lora,full,prompt,prefix,ia3,adapter] [--output out/compare]
    python bench/compare.py --variants     # LoRA, rsLoRA, DoRA, PiSSA, LoRA+ (out/variants -> variants_cpu.md)

Rerunning resumes: methods already trained in --output are scored again, not trained again (their
training time and peak memory are kept from when they trained; delete --output to start over).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="lora,full,prompt,prefix,ia3,adapter")
    parser.add_argument("--output", type=Path, default=ROOT / "out" / "compare")
    parser.add_argument("--variants", action="store_true",
                        help="LoRA's variants instead: --methods lora,rslora,dora,pissa,loraplus, --output out/variants")
    parser.add_argument("--lr", type=float, help="with --variants: a learning rate of their own instead of the "
                        "recipe's, for the variants named by --methods (out/variants-lr<LR>, variants_lr<LR>_cpu.md)")
    args = parser.parse_args()
    name, title = "compare", "LoRA among its alternatives"
    if args.variants:
        name, title = "variants", "LoRA's variants"
        if args.lr:
            name, title = f"variants_lr{args.lr:g}", f"LoRA's variants at learning rate {args.lr:g}"
        else:
            args.methods = "lora,rslora,dora,pissa,loraplus"
        args.output = ROOT / "out" / name.replace("_", "-")
    command = ["lorakit", "compare", "--config", "configs/smollm2-orders.yaml", "--methods", args.methods,
               "--test", "data/orders/test.jsonl", "--output", str(args.output)]
    if args.lr:
        command[-2:-2] = ["--lr", f"{args.lr:g}"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit", *command[1:]], cwd=ROOT, check=True)
    minutes = (time.perf_counter() - started) / 60
    table = (args.output / "compare.md").read_text(encoding="utf-8")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_cpu.md"
    invocation = "python bench/compare.py" + (" --variants" if args.variants else "") + \
        (f" --lr {args.lr:g} --methods {args.methods}" if args.lr else "")
    path.write_text(f"# {title}: the demo task (SmolLM2-135M-Instruct, orders), cpu\n\n"
                    f"Command: `{invocation}` (runs `{' '.join(command[:-2])}`)  \n"
                    f"Machine: {machine()}  \nDate: {time.strftime('%Y-%m-%d')}  \n"
                    f"Wall time of this run: {minutes:.0f} min (methods already trained in {args.output.name}/ "
                    "are scored again, not trained again; the table's training column is each method's own run)\n\n" + table, encoding="utf-8")
    shutil.copyfile(args.output / "compare.png", RESULTS / f"{name}_cpu.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
