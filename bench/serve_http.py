"""What HTTP costs: the same mixed-adapter workload through `lorakit serve`'s HTTP stack and
straight into its engine, in one run.

16 adapters (r=16 unless --rank, all linear layers, random) on the embedded SmolLM2-135M-Instruct.
For each concurrency C (16 and 64): C clients, each sending --requests chat requests one after the
other (an orders test message, its own adapter: client i uses adapter i mod 16), greedy, exactly
--tokens new tokens (the end token is ignored, as in bench/serve.py), streamed.
- HTTP: official openai clients streaming over 127.0.0.1, in a separate process (as real clients
  would be), against uvicorn + FastAPI + the engine in this one;
- engine alone: C threads of this process submitting the same requests to the same engine.
Throughput is all generated tokens over the wall time from the first request to the last answer;
time to first token (TTFT) and inter-token latency (ITL: between two consecutive text chunks of
one stream) are per request and per gap, p50 and p99. Both sides run in turns, the order reversed
every other trial; the HTTP / engine ratio is the median of each trial's ratio. On a machine whose
cores all compute the model, the clients' own CPU time is taken from it too, so the CPU time of
the server's HTTP thread (uvicorn's event loop: parsing, routing, validation, SSE) is reported
beside it, as what HTTP costs the server. ``--threads N`` gives the model N compute threads
(default: torch's, one per core); with fewer threads than cores, the clients and the server's HTTP
thread have a core of their own, as when the clients run elsewhere.

    python bench/serve_http.py [--clients 16 64] [--requests 2] [--tokens 32] [--trials 2] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import write_table

ADAPTERS = 16


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Tally:
    """Per-request timings of one run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.first_start = float("inf")
        self.last_end = 0.0

    def add(self, start: float, chunk_times: list[float], tokens: int, end: float) -> None:
        with self.lock:
            self.tokens += tokens
            self.ttft.append(chunk_times[0] - start)
            self.itl += [b - a for a, b in itertools.pairwise(chunk_times)]
            self.first_start = min(self.first_start, start)
            self.last_end = max(self.last_end, end)

    def summary(self) -> dict:
        wall = self.last_end - self.first_start
        return {"tokens_per_s": self.tokens / wall, "wall_s": wall,
                "ttft_p50": _percentile(self.ttft, 0.5), "ttft_p99": _percentile(self.ttft, 0.99),
                "itl_p50": _percentile(self.itl, 0.5), "itl_p99": _percentile(self.itl, 0.99)}


def _http_clients(port: int, jobs: list[list[tuple[str, list[dict]]]], tokens: int, out) -> None:
    """In a child process: one thread per client, each sending its jobs one after the other."""
    import openai

    tally = Tally()
    cpu = time.process_time()

    def client(work: list[tuple[str, list[dict]]]) -> None:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        for adapter, messages in work:
            start, chunks, used = time.perf_counter(), [], 0
            stream = api.chat.completions.create(model=adapter, messages=messages, max_tokens=tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks.append(time.perf_counter())
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            tally.add(start, chunks, used, time.perf_counter())

    threads = [threading.Thread(target=client, args=(work,)) for work in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(tally.summary() | {"client_cpu_s": time.process_time() - cpu})


def _engine_clients(engine, tokenizer, jobs: list[list[tuple[str, list[dict]]]], tokens: int) -> dict:
    """The same jobs, submitted by threads straight to the engine."""
    from lorakit.serve.engine import Request
    from lorakit.serve.sampling import SamplingParams

    tally = Tally()
    params = SamplingParams(max_tokens=tokens, temperature=0)

    def client(work: list[tuple[str, list[dict]]]) -> None:
        for adapter, messages in work:
            start, chunks = time.perf_counter(), []
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            request = engine.submit(Request(adapter, tokenizer(text, add_special_tokens=False)["input_ids"], params))
            while True:
                event = request.events.get()
                if event.text:
                    chunks.append(time.perf_counter())
                if event.finish_reason is not None:
                    break
            tally.add(start, chunks, event.completion_tokens, time.perf_counter())

    threads = [threading.Thread(target=client, args=(work,)) for work in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="the model's compute threads (default: torch's choice, one per core)")
    args = parser.parse_args()

    import psutil
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from bench.serve import make_adapters
    from lorakit.data.records import read_records
    from lorakit.models.base import load_base
    from lorakit.serve.app import create_app, start_service
    from lorakit.serve.server import make_server, serving_in_background

    work = Path(tempfile.mkdtemp(prefix="lorakit-serve-http-bench-"))
    paths = make_adapters(work, args.base, args.rank)
    model, tokenizer = load_base(args.base)
    service = start_service(model.eval(), tokenizer, {p.name: p for p in paths}, max_batch=32, max_waiting=1024)
    service.engine.eos_ids = set()  # every request decodes exactly the asked number of tokens
    records = read_records(ROOT / "data" / "orders" / "test.jsonl")
    messages = [[{"role": "user", "content": r["messages"][0]["content"]}] for r in records]

    def jobs(clients: int) -> list[list[tuple[str, list[dict]]]]:
        return [[(paths[c % ADAPTERS].name, messages[(c * args.requests + k) % len(messages)])
                 for k in range(args.requests)] for c in range(clients)]

    def http_thread_cpu() -> float:
        """CPU seconds used so far by the server's event-loop thread."""
        native = next(t.native_id for t in threading.enumerate() if t.name == "lorakit-http")
        return next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == native)

    spawn = multiprocessing.get_context("spawn")
    results: dict[tuple[int, str], list[dict]] = {}
    server = make_server(create_app(service), "127.0.0.1", 0, service.limits.max_body_bytes)
    with serving_in_background(server) as port:
        for clients in args.clients:
            _engine_clients(service.engine, tokenizer, jobs(clients)[:2], 4)  # warm-up
            for trial in range(args.trials):
                for side in ("engine", "http") if trial % 2 == 0 else ("http", "engine"):
                    if side == "http":
                        out = spawn.Queue()
                        child = spawn.Process(target=_http_clients, args=(port, jobs(clients), args.tokens, out))
                        before = http_thread_cpu()
                        child.start()
                        summary = out.get()
                        child.join()
                        summary["server_http_cpu_s"] = http_thread_cpu() - before
                    else:
                        summary = _engine_clients(service.engine, tokenizer, jobs(clients), args.tokens)
                    results.setdefault((clients, side), []).append(summary)
                    print(f"{clients} clients, trial {trial + 1}/{args.trials}, {side}: "
                          f"{summary['tokens_per_s']:.0f} tokens/s, TTFT p50 {1000 * summary['ttft_p50']:.0f} ms",
                          flush=True)
    service.engine.stop()

    rows = []
    for clients in args.clients:
        ratios = [h["tokens_per_s"] / e["tokens_per_s"]
                  for h, e in zip(results[(clients, "http")], results[(clients, "engine")], strict=True)]
        for side in ("engine", "http"):
            runs = results[(clients, side)]

            def median(key: str, runs=runs) -> float:
                return statistics.median(r[key] for r in runs)

            ttft = f"{1000 * median('ttft_p50'):.0f} / {1000 * median('ttft_p99'):.0f}"
            itl = f"{1000 * median('itl_p50'):.0f} / {1000 * median('itl_p99'):.0f}"
            rows.append([f"{clients}", "HTTP (openai clients, streaming)" if side == "http" else "engine alone",
                         f"{median('tokens_per_s'):.0f}", ttft, itl,
                         f"**{statistics.median(ratios):.3f}x**" if side == "http" else "",
                         f"{median('server_http_cpu_s'):.1f} / {median('client_cpu_s'):.1f} of "
                         f"{median('wall_s'):.1f}" if side == "http" else ""])
    threads, machine_cores = torch.get_num_threads(), psutil.cpu_count()
    cores = (f"The HTTP clients run in a separate process on the same {machine_cores} cores as the model's {threads} "
             "threads (their CPU time is shown: whatever of it the model would have used is taken from the model, "
             "so that part of a gap is the clients' cost, not the server's)." if threads >= machine_cores else
             f"The model computes on {threads} of the machine's {machine_cores} cores, so the HTTP clients (a separate "
             "process) and the server's HTTP thread have a core the model does not use, as when the clients run "
             "on other machines.")
    path = write_table(
        "serve_http_cpu" + ("" if args.threads is None else f"_{args.threads}thread"),
        f"HTTP against the engine alone: 16 adapters of rank {args.rank}, mixed ({args.base})",
        f"python bench/serve_http.py --clients {' '.join(map(str, args.clients))} --requests {args.requests} "
        f"--tokens {args.tokens} --trials {args.trials}"
        + ("" if args.threads is None else f" --threads {args.threads}"),
        ["clients", "path", "tokens/s", "TTFT p50 / p99 (ms)", "ITL p50 / p99 (ms)", "HTTP / engine throughput",
         "CPU s: server's HTTP thread / client process, of wall s"],
        rows,
        notes=f"Each client sends {args.requests} chat requests one after the other on its own adapter (client i on "
              f"adapter i mod 16), greedy, exactly {args.tokens} new tokens each; max batch 32, so at 64 clients half "
              f"of them wait for a row. {cores} The engine-alone client threads run in the server's process. "
              "Medians over trials; the ratio is the median of each trial's ratio.")
    print(path.read_text())


if __name__ == "__main__":
    main()
