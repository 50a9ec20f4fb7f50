"""`lorakit serve` over HTTP, driven by the official openai client, on 127.0.0.1."""

import http.client
import json

import openai
import pytest
import torch

import lorakit
from lorakit.cli import main


def _client(port, key):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)


def _alone(app, adapter, prompt_ids, max_tokens):
    """What transformers' generate() says with only this adapter on (under the engine's lock)."""
    with app.engine.lock:
        lorakit.set_adapter(app.engine.model, adapter)
        out = app.engine.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                                        pad_token_id=2)
    new = out[0, len(prompt_ids):].tolist()
    return app.engine.tokenizer.decode(new[:new.index(2)] if 2 in new else new, skip_special_tokens=True)


def test_chat_completion_is_the_adapters_greedy_answer(server):
    app, port, _ = server
    reply = _client(port, "sk-acme-1").chat.completions.create(
        model="acme-orders", messages=[{"role": "user", "content": "two pizzas please"}], max_tokens=8,
        temperature=0)
    tokenizer = app.engine.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "two pizzas please"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert reply.choices[0].message.content == _alone(app, "acme-orders", ids, 8)
    assert reply.model == "acme-orders" and reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_equals_the_whole_one(server):
    _, port, _ = server
    client = _client(port, "sk-acme-1")
    whole = client.completions.create(model="acme-support", prompt="Order: three teas", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="acme-support", prompt="Order: three teas", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_streamed_chat_sends_role_text_usage_and_done(server):
    _, port, _ = server
    stream = _client(port, "sk-globex-1").chat.completions.create(
        model="globex-orders", messages=[{"role": "user", "content": "a bagel"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_tenants_see_and_use_only_their_own_adapters(server):
    app, port, _ = server
    acme = {m.id for m in _client(port, "sk-acme-1").models.list()}
    globex = {m.id for m in _client(port, "sk-globex-1").models.list()}
    assert acme == {app.base_name, "acme-orders", "acme-support"}
    assert globex == {app.base_name, "globex-orders"}
    errors = []
    for model in ("acme-orders", "no-such-adapter"):  # another tenant's adapter reads as a missing one
        with pytest.raises(openai.NotFoundError) as caught:
            _client(port, "sk-globex-1").completions.create(model=model, prompt="hi", max_tokens=2)
        errors.append(caught.value.body["message"].replace(model, "NAME"))
    assert errors[0] == errors[1]
    base = _client(port, "sk-globex-1").completions.create(model=app.base_name, prompt="hi", max_tokens=2)
    assert base.choices[0].text is not None


def test_a_bad_key_is_refused(server):
    _, port, _ = server
    with pytest.raises(openai.AuthenticationError):
        _client(port, "sk-wrong-key").models.list()


def _post(port, path, body: bytes, key="sk-acme-1", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {key}",
                                                   "Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "hi"}).encode(), 400, "model: Field required"),
    (json.dumps({"model": "acme-orders", "prompt": "hi", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "acme-orders", "prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "acme-orders", "prompt": "hi " * 3000}).encode(), 400, "tokens"),
    (json.dumps({"model": "acme-orders", "prompt": "x" * (2 << 20)}).encode(), 413, "bytes"),
])
def test_bad_bodies_get_openai_errors_and_the_server_keeps_serving(server, body, status, words):
    _, port, _ = server
    got, payload = _post(port, "/v1/completions", body)
    assert got == status and words in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert _client(port, "sk-acme-1").completions.create(model="acme-orders", prompt="hi", max_tokens=1)


def test_a_full_queue_answers_429(server):
    app, port, _ = server
    app.engine.max_waiting, saved = 0, app.engine.max_waiting
    try:
        with pytest.raises(openai.RateLimitError):
            _client(port, "sk-acme-1").completions.create(model="acme-orders", prompt="hi", max_tokens=1)
    finally:
        app.engine.max_waiting = saved


def test_the_admin_loads_and_unloads_adapters_from_the_adapter_directory_only(server, tmp_path):
    _, port, root = server
    load = "/v1/load_lora_adapter"
    assert _post(port, load, json.dumps({"lora_name": "acme-extra", "lora_path": "acme-extra"}).encode())[0] == 401
    (root / "escape").symlink_to(tmp_path)
    for path in ("../adapters", str(root / "acme-extra"), "escape", "x" * 5000, "\u0158" * 300):  # too long: 400 too
        status, payload = _post(port, load, json.dumps({"lora_name": "x", "lora_path": path}).encode(),
                                key="admin-secret-key")
        assert status == 400 and "lora_path" in payload["error"]["message"]
    status, payload = _post(port, load, json.dumps({"lora_name": "acme-extra", "lora_path": "acme-extra"}).encode(),
                            key="admin-secret-key")
    assert status == 200 and payload["load_ms"] < 5000
    assert "acme-extra" in {m.id for m in _client(port, "sk-acme-1").models.list()}
    _client(port, "sk-acme-1").completions.create(model="acme-extra", prompt="hi", max_tokens=2)
    status, _ = _post(port, "/v1/unload_lora_adapter", json.dumps({"lora_name": "acme-extra"}).encode(),
                      key="admin-secret-key")
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        _client(port, "sk-acme-1").completions.create(model="acme-extra", prompt="hi", max_tokens=2)


def test_an_open_server_refuses_to_listen_beyond_loopback(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "loopback only" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "words"), [
    (["--adapter", "orders"], "NAME=DIR"),
    (["--tenants", "no-such-file.yaml"], "cannot read the tenants file"),
    (["--adapter-dir", "no-such-dir"], "no such directory"),
    (["--max-batch", "0"], "at least 1"),
])
def test_serve_arguments_are_checked_before_the_model_loads(args, words, capsys):
    assert main(["serve", *args]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(("native", "exact_4bit", "expected"), [
    (True, False, "bfloat16"), (False, False, "float32"), (True, True, "float32")])
def test_serve_dtype_auto_is_bfloat16_only_where_the_device_multiplies_it_natively(native, exact_4bit, expected,
                                                                                   monkeypatch):
    from lorakit.commands.serve import served_dtype
    from lorakit.train import precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    assert served_dtype("auto", exact_4bit) == expected
    assert served_dtype("float32", False) == "float32" and served_dtype("bfloat16", True) == "bfloat16"
