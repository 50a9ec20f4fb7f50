"""What the benchmarks share: the SmolLM2-135M shape, a peak-memory probe, and result tables."""

from __future__ import annotations

import ctypes
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from typing_extensions import Self

RESULTS = Path(__file__).parent / "results"


def smollm2_shaped_llama(seed: int = 0) -> torch.nn.Module:
    """A Llama with SmolLM2-135M's exact shape and random weights (nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


class PeakMemory:
    """Peak memory in use above the level at start: CUDA's allocator counter, or on CPU the bytes
    malloc has handed out and not taken back (glibc's mallinfo2), sampled every millisecond by a
    thread. Not the resident set: glibc keeps freed memory mapped, so the resident set depends
    on allocation history and swung by 2x between identical runs here."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _live_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _live_bytes() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _live_bytes() - self.start)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _MallInfo2


def _live_bytes() -> int:
    """Bytes allocated through malloc and not freed: heap chunks in use plus mmapped chunks."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def cpuinfo(field: str) -> str | None:
    """The value of ``field`` ("model name", "flags") in Linux's /proc/cpuinfo, or None without one."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith(field)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (bfloat16's speed, for one, depends on it), or the architecture."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_table(name: str, title: str, command: str, header: list[str], rows: list[list[str]], notes: str = "") -> Path:
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Date: {time.strftime('%Y-%m-%d')}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def alternate_workers(script: str, libraries: tuple[str, ...], trials: int, worker_args: list[str]) -> dict[str, list[dict]]:
    """Run ``script --worker LIB *worker_args`` once per library per trial, the order alternating
    between trials so that machine noise hits every library alike; each child prints its result
    as JSON on its last line."""
    results: dict[str, list[dict]] = {lib: [] for lib in libraries}
    for trial in range(trials):
        for lib in libraries if trial % 2 == 0 else libraries[::-1]:
            cmd = [sys.executable, script, "--worker", lib, *worker_args]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[lib].append(json.loads(out.strip().splitlines()[-1]))
            r = results[lib][-1]
            print(f"trial {trial + 1}/{trials} {lib:8s} median step {statistics.median(r['times']):.3f}s "
                  f"peak +{r['peak'] / 2**20:.0f} MiB", flush=True)
    return results
