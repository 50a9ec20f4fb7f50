"""A bounded load test on 127.0.0.1: 32 concurrent clients, 320 requests across tenants, adapters
and the base model. Every answer must be the one its request gets alone: none lost, none mixed up.
Run with -s to see the latency percentiles."""

import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

CLIENTS = 32
REQUESTS = 320
MESSAGES = ["two pizzas", "a coffee to 5 Elm Street", "one bagel, small", "six teas for pickup",
            "a dozen donuts", "three wraps to 9 Hill Lane", "soup", "four lattes, large"]


def test_concurrent_clients_each_get_their_own_answer(server):
    app, port, _ = server
    routes = [("sk-acme-1", "acme-orders"), ("sk-acme-1", "acme-support"), ("sk-globex-1", "globex-orders"),
              ("sk-globex-1", app.base_name)]

    def ask(key, model, message):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        start = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}],
                                               max_tokens=6, temperature=0)
        return reply.choices[0].message.content, time.perf_counter() - start

    expected = {(m, msg): ask(k, m, msg)[0] for k, m in routes for msg in MESSAGES}  # one at a time
    rng = random.Random(0)
    jobs = [(*rng.choice(routes), rng.choice(MESSAGES)) for _ in range(REQUESTS)]
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    elapsed = time.perf_counter() - start

    assert len(results) == REQUESTS
    wrong = [(job, text) for job, (text, _) in zip(jobs, results, strict=True) if text != expected[job[1:]]]
    assert not wrong, wrong[:3]
    latencies = sorted(t for _, t in results)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload test: {REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s; latency p50 "
          f"{1000 * statistics.median(latencies):.0f} ms, p99 {1000 * p99:.0f} ms")
