"""Adapter load time: from an adapter directory to an adapter the model can serve, lorakit vs PEFT.

The adapter: r=16 on every linear layer of a SmolLM2-135M-shaped Llama (210 layers, 4.9M
parameters, 18.7 MB of float32). Timed, per load, in one process, the two libraries interleaved:
- lorakit: `AdapterRegistry.register` as `lorakit serve` calls it for a request to load an
  adapter: read the files once, check every tensor (names, dtypes, shapes against the model,
  rank limit, finite values, no base weights), then place A and B in the model (inactive, ready
  to be picked per row);
- PEFT: `PeftModel.load_adapter(..., low_cpu_mem_usage=True)` (its fastest documented mode: the
  adapter's layers are made on the meta device and its tensors assigned), and the default mode.
Both models hold one adapter throughout (its layers are LoRA layers already, as in a running
server); each timed load gets a new name and is deleted afterwards, so every load meets the same model.

    python bench/adapter_load.py [--loads 20] [--rank 16]

Writes bench/results/adapter_load_<device>.md.
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
from bench.common import smollm2_shaped_llama, write_table


def _saved_adapter(directory: Path, rank: int) -> Path:
    import lorakit

    model = smollm2_shaped_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for param in lorakit.lora_parameters(model):
            param.normal_(0, 0.01)
    lorakit.save_adapter(model, directory / "adapter")
    return directory / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=20, help="timed loads per library")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    from peft import PeftModel

    from lorakit.serve.registry import AdapterRegistry

    with tempfile.TemporaryDirectory() as tmp:
        adapter = _saved_adapter(Path(tmp), args.rank)
        size = sum(f.stat().st_size for f in adapter.iterdir())
        registry = AdapterRegistry(smollm2_shaped_llama().eval(), budget_bytes=1 << 32)
        registry.register("first", adapter)  # both sides hold one adapter throughout, as a server would
        peft = PeftModel.from_pretrained(smollm2_shaped_llama().eval(), adapter, adapter_name="first")

        def lorakit_load(i: int) -> None:
            registry.register(f"a{i}", adapter)

        def peft_load(i: int, fast: bool) -> None:
            peft.load_adapter(adapter, adapter_name=f"a{i}", low_cpu_mem_usage=fast)

        timed = {"lorakit": [], "peft_fast": [], "peft": []}
        for i in range(args.loads + 1):  # the first round warms up, untimed
            for name, load, unload in (("lorakit", lorakit_load, registry.unregister),
                                       ("peft_fast", lambda n: peft_load(n, True), peft.delete_adapter),
                                       ("peft", lambda n: peft_load(n, False), peft.delete_adapter)):
                start = time.perf_counter()
                load(i)
                elapsed = time.perf_counter() - start
                unload(f"a{i}")
                if i:
                    timed[name].append(1000 * elapsed)
    ms = {name: statistics.median(times) for name, times in timed.items()}
    for name, times in timed.items():
        print(f"{name:10s} median {ms[name]:.1f} ms (min {min(times):.1f}, max {max(times):.1f})")

    rows = [["lorakit: AdapterRegistry.register (read, check every tensor, place)", f"{ms['lorakit']:.1f} ms", "1.00x"],
            ["PEFT load_adapter, low_cpu_mem_usage=True", f"{ms['peft_fast']:.1f} ms",
             f"**{ms['lorakit'] / ms['peft_fast']:.2f}x**"],
            ["PEFT load_adapter, default", f"{ms['peft']:.1f} ms", f"**{ms['lorakit'] / ms['peft']:.2f}x**"]]
    command = f"python bench/adapter_load.py --loads {args.loads} --rank {args.rank}"
    path = write_table(
        "adapter_load_cpu", "Adapter load time, lorakit vs PEFT (SmolLM2-135M shape, CPU)", command,
        ["load", "median of the loads", "lorakit / this"], rows,
        notes=f"One adapter of rank {args.rank} on all 210 linear layers ({size / 2**20:.1f} MiB file), loaded "
              f"{args.loads} times per library under a new name each time and deleted after, the libraries "
              "interleaved in one process, after one untimed round, each model holding one other adapter throughout. lorakit's number includes every check it "
              "makes before the model changes (PEFT checks neither finiteness nor rank); PEFT's does not include "
              "making the PeftModel, which existed before the first load.",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
