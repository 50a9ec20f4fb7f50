"""A lorakit adapter exported with `lorakit export --gguf-lora`, run by llama.cpp: same answers?

lorakit answers the first N orders test prompts greedily with ADAPTER on the embedded SmolLM2
(float32, unmerged); llama.cpp (llama-cpp-python) answers them with the embedded Q4_1 GGUF and the
exported adapter GGUF, and once more without the adapter (which must change the answers).
llama-cpp-python builds from source (~11-26 min on 2 cores), so it lives in its own environment:

    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python
    python bench/llama_cpp_lora.py --llama-python /tmp/llvenv/bin/python [--adapter out/orders] [--prompts 40]

Writes bench/results/llama_cpp_lora_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import write_table

LLAMA_SIDE = """
import json, sys
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
answers = {}
for name, lora in (("with adapter", job["lora"]), ("base alone", None)):
    llm = Llama(model_path=job["base"], lora_path=lora, n_ctx=1024, n_threads=2, verbose=False, seed=0)
    answers[name] = [llm.create_chat_completion(messages=m, temperature=0, max_tokens=job["max_tokens"])
                     ["choices"][0]["message"]["content"] for m in job["messages"]]
json.dump(answers, open(sys.argv[2], "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--adapter", default="out/orders", help="a plain LoRA adapter for SmolLM2")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from lorakit.adapter_math.gguf_lora import export_gguf_lora
    from lorakit.data.records import read_records
    from lorakit.files.peft_format import read_adapter
    from lorakit.generation.generate import generate_texts
    from lorakit.generation.prompts import chat_prompt
    from lorakit.models.base import embedded_gguf_path, load_for_inference

    records = read_records(ROOT / "data" / "orders" / "test.jsonl")[:args.prompts]
    messages = [[m for m in r["messages"] if m["role"] != "assistant"] for r in records]
    model, tokenizer = load_for_inference(None, args.adapter)
    ours = generate_texts(model, tokenizer, [chat_prompt(tokenizer, m) for m in messages], args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        lora = export_gguf_lora(read_adapter(args.adapter), embedded_gguf_path(), Path(tmp) / "adapter.gguf").output
        job = {"base": str(embedded_gguf_path()), "lora": str(lora), "messages": messages, "max_tokens": args.max_tokens}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        subprocess.run([args.llama_python, "-c", LLAMA_SIDE, str(Path(tmp) / "job.json"), str(Path(tmp) / "out.json")],
                       check=True)
        theirs = json.loads((Path(tmp) / "out.json").read_text())

    def same(answers: list[str]) -> int:
        return sum(a.strip() == b.strip() for a, b in zip(answers, ours, strict=True))

    n = len(records)
    rows = [["llama.cpp, Q4_1 base + exported adapter GGUF", f"{same(theirs['with adapter'])}/{n}"],
            ["llama.cpp, Q4_1 base alone (the adapter must matter)", f"{same(theirs['base alone'])}/{n}"]]
    path = write_table(
        "llama_cpp_lora_cpu", "lorakit export --gguf-lora, run by llama.cpp (SmolLM2-135M-Instruct, CPU)",
        f"python bench/llama_cpp_lora.py --llama-python PYTHON --adapter {args.adapter} --prompts {args.prompts} "
        f"--max-tokens {args.max_tokens}",
        ["greedy answers to the first orders test prompts", "same answer as lorakit"], rows,
        notes=f"lorakit: {args.adapter} unmerged on the embedded SmolLM2 (its Q4_1 weights de-quantized to float32), "
              f"greedy, up to {args.max_tokens} tokens. llama.cpp (llama-cpp-python) computes with the Q4_1 weights "
              "and the adapter GGUF's float32 A and B, temperature 0, same chat template (from the GGUF).")
    print(path.read_text())


if __name__ == "__main__":
    main()
