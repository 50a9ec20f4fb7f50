"""`lorakit serve` tried as a hostile client would, over real sockets against a server started here.
One test (or more) per way the server was found to be open: request smuggling, a request that
failed everyone's batch, unchecked reloads, slow clients, abandoned work, open admin routes,
leaked paths, and one tenant crowding out the others."""

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.serve.server import ConnectionLimits
from tests.serve.conftest import running_server


def _exchange(port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Everything the server sends back on one connection for ``data``, until it closes or goes
    quiet for ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def _post(path: str, body: bytes, key: str, content_type: str = "application/json", close: bool = True) -> bytes:
    """A POST request; with ``close`` it asks the server to close the connection after answering."""
    connection = "Connection: close\r\n" if close else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{connection}\r\n").encode() + body


def _get(path: str, key: str = "", host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n".encode()


def _json(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _client(port, key, **options):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, **options)


# --- 1. request smuggling -----------------------------------------------------------------------

SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-acme-1\r\n\r\n"


@pytest.mark.parametrize(("path", "key", "content_type", "status"), [
    ("/v1/chat/completions", "sk-wrong-key", "application/json", 401),  # answered before the body matters
    ("/v1/no-such-route", "sk-globex-1", "application/json", 404),
    ("/v1/chat/completions", "sk-globex-1", "text/plain", 415),  # refused without reading the body
])
def test_a_body_is_never_read_as_a_second_request(server, path, key, content_type, status):
    _, port, _ = server
    response = _exchange(port, _post(path, SMUGGLED, key, content_type, close=False))  # the connection stays open
    assert response.count(b"HTTP/1.1 ") == 1 and _status(response) == status
    assert b"acme-orders" not in response  # the smuggled request, with another tenant's key, got no answer


def test_pipelined_requests_are_answered_in_order_each_with_its_own_key(server):
    _, port, _ = server
    get = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n"
    response = _exchange(port, (get.format("sk-globex-1") + get.format("sk-wrong-key")).encode())
    first, second = response.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and b"globex-orders" in first and b"acme-orders" not in first
    assert second.startswith(b"401")


# --- 2. one request must not fail everyone's batch ------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [("temperature", 1e-300), ("temperature", 0.001),
                                              ("top_p", 0.0), ("max_tokens", 0), ("seed", 2**70)])
def test_sampling_settings_that_could_overflow_are_refused_by_name(server, field, value):
    _, port, _ = server
    body = json.dumps({"model": "acme-orders", "prompt": "hi", "max_tokens": 2, field: value}).encode()
    response = _exchange(port, _post("/v1/completions", body, "sk-acme-1"))
    error = _json(response)["error"]
    assert _status(response) == 400 and error["param"] == field and field in error["message"]


@pytest.mark.parametrize("raw", [b'{"model": "acme-orders", "prompt": "hi", "temperature": NaN}',
                                 b'{"model": "acme-orders", "prompt": "hi", "top_p": Infinity}',
                                 b'{"model": "acme-orders", "prompt": "hi", "max_tokens": 2.0}',
                                 b'{"model": "acme-orders", "prompt": "hi", "stream": "yes"}',
                                 b'{"model": "acme-orders", "messages": [{"role": "user"}]}'])
def test_non_finite_numbers_and_wrong_types_are_400s(server, raw):
    _, port, _ = server
    assert _status(_exchange(port, _post("/v1/completions", raw, "sk-acme-1"))) == 400


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("logprobs", True), ("tools", [{"type": "function"}]),
                                              ("response_format", {"type": "json_schema"}), ("best_of", 3),
                                              ("frequency_penalty", 0.5)])
def test_fields_lorakit_does_not_implement_are_named_not_ignored(server, field, value):
    _, port, _ = server
    body = json.dumps({"model": "acme-orders", "messages": [{"role": "user", "content": "hi"}], field: value})
    response = _exchange(port, _post("/v1/chat/completions", body.encode(), "sk-acme-1"))
    error = _json(response)["error"]
    assert _status(response) == 400 and error["param"] == field and field in error["message"]
    neutral = json.dumps({"model": "acme-orders", "messages": [{"role": "user", "content": "hi"}], "n": 1,
                          "logprobs": False, "tools": [], "max_tokens": 1,
                          "response_format": {"type": "json_object"}})  # neutral or implemented values pass
    assert _status(_exchange(port, _post("/v1/chat/completions", neutral.encode(), "sk-acme-1"), wait=10)) == 200


# --- 3. every load of an adapter is checked, reloads too ------------------------------------------

@pytest.fixture
def small_budget_server(tiny_base_dir, adapter_root, tenants_file, tmp_path):
    """The two tenants' adapters copied to tmp_path (so the test may spoil them), with room in memory
    for one adapter at a time: every switch evicts one and reloads the other from disk."""
    import shutil

    for name in ("acme-orders", "globex-orders", "acme-support"):
        shutil.copytree(adapter_root / name, tmp_path / name)
    adapters = {n: tmp_path / n for n in ("acme-orders", "globex-orders", "acme-support")}
    sizes = [4 * t.numel() for t in load_file(str(tmp_path / "acme-support" / "adapter_model.safetensors")).values()]
    with running_server(tiny_base_dir, adapters, tenants_file, adapter_budget_bytes=sum(sizes)) as (service, port):
        yield service, port, tmp_path


def test_an_adapter_spoiled_on_disk_after_registration_is_refused_at_reload(small_budget_server, caplog):
    service, port, root = small_budget_server
    acme, globex = _client(port, "sk-acme-1"), _client(port, "sk-globex-1")
    healthy = globex.completions.create(model="globex-orders", prompt="hi", max_tokens=4, temperature=0)
    weights = root / "acme-orders" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(t, float("nan")) for k, t in tensors.items()}, str(weights))
    acme.completions.create(model="acme-support", prompt="hi", max_tokens=1)  # evicts acme-orders
    assert not service.registry.info("acme-orders").loaded
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"), pytest.raises(openai.APIStatusError) as caught:
        acme.completions.create(model="acme-orders", prompt="hi", max_tokens=4)
    assert caught.value.status_code == 503 and str(root) not in str(caught.value.body)
    assert "NaN" in caplog.text  # the operator is told why
    again = globex.completions.create(model="globex-orders", prompt="hi", max_tokens=4, temperature=0)
    assert again.choices[0].text == healthy.choices[0].text  # the other tenant is untouched
    assert 'lorakit_adapter_load_failures_total 1.0' in _metrics(port)


def test_an_adapter_that_would_replace_base_weights_is_refused_at_reload(small_budget_server):
    service, port, root = small_budget_server
    weights = root / "acme-orders" / "adapter_model.safetensors"
    vocab = service.engine.model.get_input_embeddings().weight
    save_file(load_file(str(weights)) | {"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros_like(
        vocab)}, str(weights))
    _client(port, "sk-acme-1").completions.create(model="acme-support", prompt="hi", max_tokens=1)  # evicts it
    before = vocab.detach().clone()
    with pytest.raises(openai.APIStatusError) as caught:
        _client(port, "sk-acme-1").completions.create(model="acme-orders", prompt="hi", max_tokens=1)
    assert caught.value.status_code == 503
    assert torch.equal(service.engine.model.get_input_embeddings().weight, before)  # the shared base is as it was


def test_each_load_reads_the_adapter_once_and_applies_what_it_checked(tiny_base_dir, adapter_root, monkeypatch):
    from lorakit.serve import registry as registry_module

    reads = []
    real = registry_module.read_adapter
    monkeypatch.setattr(registry_module, "read_adapter", lambda *a, **k: reads.append(a[0].name) or real(*a, **k))
    monkeypatch.setattr("safetensors.safe_open", None)  # no separate header read
    adapters = {n: adapter_root / n for n in ("acme-orders", "acme-extra")}  # both r=4: room for one at a time
    size = sum(4 * t.numel() for t in load_file(str(adapter_root / "acme-orders" / "adapter_model.safetensors"))
               .values())
    with running_server(tiny_base_dir, adapters, adapter_budget_bytes=size) as (service, _):
        assert reads == ["acme-orders", "acme-extra"]  # one read each; the second load evicted the first
        service.registry.acquire("acme-orders")
        assert reads == ["acme-orders", "acme-extra", "acme-orders"]  # the reload reads (and checks) again


# --- 4. slow clients ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(tiny_base_dir, adapter_root):
    connections = ConnectionLimits(max_connections=4, receive_timeout_s=1.0, keep_alive_s=1.0)
    with running_server(tiny_base_dir, {"acme-orders": adapter_root / "acme-orders"}, connections=connections,
                        admin_key="admin-secret-key") as (service, port):
        yield service, port


def test_a_request_that_is_never_finished_is_cut_off(strict_server):
    _, port = strict_server
    start = time.monotonic()
    for partial in (b"GET /v1/mod", _post("/v1/completions", b'{"model": "acme-or', "x")[:-3]):
        response = _exchange(port, partial, wait=5.0)  # headers, or the body, never end
        assert _status(response) == 408
    assert time.monotonic() - start < 6


@pytest.fixture(scope="module")
def capped_server(tiny_base_dir, adapter_root):
    """Four connections at most. The receive deadline (3 s) is the margin the test below has
    between opening its slow connections and the server answering its next one: long enough that
    a loaded CI machine does not close the slow ones first."""
    connections = ConnectionLimits(max_connections=4, receive_timeout_s=3.0, keep_alive_s=1.0)
    with running_server(tiny_base_dir, {"acme-orders": adapter_root / "acme-orders"}, connections=connections) \
            as (_, port):
        yield port


def test_connections_beyond_the_cap_are_turned_away_until_slow_ones_time_out(capped_server):
    slow = [socket.create_connection(("127.0.0.1", capped_server), timeout=15.0) for _ in range(4)]
    for sock in slow:
        sock.sendall(b"GET /hea")  # half a request each
    try:
        # The server accepts connections in the order they came, so the slow ones hold all four
        # places by the time this one's request is read.
        assert _status(_exchange(capped_server, _get("/health"))) == 503
        for sock in slow:  # each is told 408 and closed when its receive deadline passes
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert _status(answer) == 408
        assert _status(_exchange(capped_server, _get("/health"))) == 200
    finally:
        for sock in slow:
            sock.close()


# --- 5. abandoned work is cancelled -----------------------------------------------------------------

@pytest.fixture
def slow_engine_server(tiny_base_dir, adapter_root, tenants_file):
    """Decoding steps slowed to 20 ms (a bigger model's pace), so that a request of 400 tokens
    would run for 8 s if nobody stopped it. Yields (service, port, steps): steps[0] counts the
    decoding steps run."""
    adapters = {n: adapter_root / n for n in ("acme-orders", "acme-support", "globex-orders")}
    with running_server(tiny_base_dir, adapters, tenants_file, max_batch=4) as (service, port):
        decode, steps = service.engine._decode, [0]

        def slow_decode():
            time.sleep(0.02)
            decode()
            steps[0] += 1

        service.engine._decode = slow_decode
        yield service, port, steps


def _stopped_early(service, steps: list[int]) -> bool:
    """Whether the engine goes idle having run fewer than half of a 400-token request's decoding
    steps. Counted in steps, not seconds: on a loaded machine noticing the end takes longer, but a
    request that nobody stopped always runs all 400."""
    deadline = time.monotonic() + 10
    while service.engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    return not service.engine.busy and steps[0] < 200


def _long_request(stream: bool) -> bytes:
    return _post("/v1/completions", json.dumps({"model": "acme-orders", "prompt": "hi", "max_tokens": 400,
                                                 "temperature": 1.0, "stream": stream}).encode(), "sk-acme-1")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_has_its_request_cancelled(slow_engine_server, stream):
    service, port, steps = slow_engine_server
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(_long_request(stream))
    deadline = time.monotonic() + 5
    while not service.engine.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    sock.close()
    assert _stopped_early(service, steps)


def test_a_request_whose_handler_fails_leaves_the_batch(slow_engine_server, monkeypatch):
    from lorakit.serve import app as app_module

    service, port, steps = slow_engine_server

    next_event, calls = app_module._Job.next_event, []

    async def breaks_after_the_first_token(self):
        calls.append(self)
        if len(calls) > 1:  # mid-generation: 399 tokens still to come
            raise RuntimeError("the handler broke after submitting")
        return await next_event(self)

    monkeypatch.setattr(app_module._Job, "next_event", breaks_after_the_first_token)
    response = _exchange(port, _long_request(False), wait=10)
    assert _status(response) == 500
    assert _stopped_early(service, steps)


# --- 6. administration ------------------------------------------------------------------------------

def test_an_open_server_without_an_admin_key_has_no_admin_routes(tiny_base_dir, adapter_root):
    with running_server(tiny_base_dir, {}, adapter_root=adapter_root) as (_, port):
        body = json.dumps({"lora_name": "acme-extra", "lora_path": "acme-extra"}).encode()
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert _status(_exchange(port, _post(path, body, ""))) == 403


def test_an_open_servers_admin_routes_need_its_key_and_json(strict_server):
    service, port = strict_server
    body = json.dumps({"lora_name": "acme-orders"}).encode()
    assert _status(_exchange(port, _post("/v1/unload_lora_adapter", body, "wrong-key-123"))) == 401
    # A web page can send a form or text/plain POST across sites without asking; never JSON.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = _exchange(port, _post("/v1/unload_lora_adapter", body, "admin-secret-key", content_type))
        assert _status(response) == 415
    assert b"access-control-allow-origin" not in response.lower()
    assert "acme-orders" in service.registry


def test_a_loopback_server_answers_only_loopback_host_names(strict_server):
    _, port = strict_server
    for host in ("attacker.example", "attacker.example:8000", "10.0.0.1"):
        assert _status(_exchange(port, _get("/health", host=host))) == 421
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert _status(_exchange(port, _get("/health", host=host))) == 200


# --- 7. no server paths in answers --------------------------------------------------------------------

def test_answers_name_the_base_model_and_never_a_server_path(server, tiny_base_dir, tmp_path):
    service, port, root = server
    models = _exchange(port, _get("/v1/models", "sk-acme-1"))
    assert str(tiny_base_dir) not in models.decode() and service.base_name == tiny_base_dir.name
    assert _json(_exchange(port, _get("/health"))) == {"status": "ok"}
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "adapter_model.safetensors").write_bytes(
        (root / "acme-orders" / "adapter_model.safetensors").read_bytes())
    (root / "broken" / "adapter_config.json").write_text("{not json")  # the error names the file
    body = json.dumps({"lora_name": "broken", "lora_path": "broken"}).encode()
    response = _exchange(port, _post("/v1/load_lora_adapter", body, "admin-secret-key"))
    assert _status(response) == 400 and b"not valid JSON" in response and str(root).encode() not in response


# --- 8. fair turns and per-tenant quotas ---------------------------------------------------------------

def test_a_tenant_with_one_request_does_not_wait_behind_another_tenants_twenty(slow_engine_server):
    service, port, _ = slow_engine_server  # max_batch 4
    decode = service.engine._decode
    service.engine._decode = lambda: (time.sleep(0.08), decode())  # a wave of 8 tokens takes ~0.8 s
    finished: list[str] = []
    lock = threading.Lock()

    def ask(key, model):
        _client(port, key, timeout=60).completions.create(model=model, prompt="hi", max_tokens=8, temperature=0)
        with lock:
            finished.append(key)

    with ThreadPoolExecutor(21) as pool:
        crowd = [pool.submit(ask, "sk-acme-1", "acme-orders") for _ in range(20)]
        deadline = time.monotonic() + 10
        while service.engine.waiting < 16:  # 4 rows taken, the rest of the 20 waiting
            assert time.monotonic() < deadline
            time.sleep(0.01)
        alone = pool.submit(ask, "sk-globex-1", "globex-orders")
        alone.result()
        for job in crowd:
            job.result()
    # globex's request takes the next free row: it ends in the second wave, with at most 8 of acme's before it.
    assert finished.index("sk-globex-1") <= 8


def test_a_tenant_over_its_quota_is_told_to_wait_and_only_that_tenant(tiny_base_dir, adapter_root, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text('tenants:\n  acme: {api_keys: ["sk-acme-1"], adapters: ["acme-orders"], max_requests: 2}\n'
                       '  globex: {api_keys: ["sk-globex-1"], adapters: ["globex-orders"]}\n')
    adapters = {n: adapter_root / n for n in ("acme-orders", "globex-orders")}
    with running_server(tiny_base_dir, adapters, tenants, max_batch=1) as (service, port):
        decode = service.engine._decode
        service.engine._decode = lambda: (time.sleep(0.05), decode())
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(_client(port, "sk-acme-1", timeout=60).completions.create, model="acme-orders",
                                prompt="hi", max_tokens=20) for _ in range(2)]
            while service.engine.busy < 2:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError):
                _client(port, "sk-acme-1").completions.create(model="acme-orders", prompt="hi", max_tokens=1)
            other = _client(port, "sk-globex-1", timeout=60).completions.create(model="globex-orders", prompt="hi",
                                                                                 max_tokens=1)
            assert other.choices[0].finish_reason in ("stop", "length")
            for job in held:
                job.result()


# --- metrics and the access log ------------------------------------------------------------------------

def _metrics(port: int, key: str = "admin-secret-key") -> str:
    response = _exchange(port, _get("/metrics", key))
    assert _status(response) == 200
    return response.split(b"\r\n\r\n", 1)[1].decode()


def test_metrics_need_the_admin_key_and_count_requests_by_tenant_and_adapter(server, caplog):
    _, port, _ = server
    assert _status(_exchange(port, _get("/metrics", "sk-acme-1"))) == 401
    before = _metrics(port)
    with caplog.at_level(logging.INFO, logger="lorakit.access"):
        reply = _client(port, "sk-globex-1").completions.create(model="globex-orders", prompt="secret prompt",
                                                                max_tokens=3)
    after = _metrics(port)

    def value(text, line):
        return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    label = '{adapter="globex-orders",tenant="globex"}'
    assert value(after, "lorakit_generation_tokens_total" + label) - value(
        before, "lorakit_generation_tokens_total" + label) == reply.usage.completion_tokens
    assert value(after, 'lorakit_requests_total{adapter="globex-orders",status="200",tenant="globex"}') >= 1
    for name in ("lorakit_num_requests_running", "lorakit_num_requests_waiting", "lorakit_adapters_resident",
                 "lorakit_adapter_memory_bytes", "lorakit_request_duration_seconds_count",
                 "lorakit_time_to_first_token_seconds_count", "lorakit_adapter_loads_total",
                 "lorakit_prompt_tokens_total"):
        assert name in after
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lorakit.access"]
    assert lines[-1]["tenant"] == "globex" and lines[-1]["status"] == 200 and lines[-1]["adapter"] == "globex-orders"
    assert "secret prompt" not in caplog.text and "sk-globex-1" not in caplog.text
