"""The API fuzzed from its own OpenAPI schema (schemathesis): schema-valid and schema-violating
bodies for every route, with a tenant's key and with the admin's. Whatever comes in, no answer is
a 5xx, and the server still answers afterwards. Bounded: a fixed number of examples per route and
mode, each answer at most 4 tokens."""

import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.serve.conftest import running_server

EXAMPLES = 60  # per route and generation mode


@pytest.fixture(scope="module")
def fuzzed_server(tiny_base_dir, adapter_root, tenants_file):
    from lorakit.serve.app import Limits

    adapters = {n: adapter_root / n for n in ("acme-orders", "globex-orders")}
    with running_server(tiny_base_dir, adapters, tenants_file, adapter_root,
                        limits=Limits(max_tokens=4, max_prompt_tokens=256)) as (service, port):
        yield service, port


def _check_no_server_error(case, session: requests.Session) -> None:
    if case.path == "/v1/unload_lora_adapter" and isinstance(case.body, dict) and "lora_name" in case.body:
        case.body["lora_name"] = "not-" + str(case.body["lora_name"])  # keep the served adapters served
    for key in ("sk-acme-1", "admin-secret-key"):  # a tenant's key and the admin's
        response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=30, session=session)
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error(fuzzed_server, mode):
    _, port = fuzzed_server
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"}
    with requests.Session() as session:  # one connection pool, closed at the end (no socket left to the GC)
        for operation in operations:
            if mode == "negative" and operation.method.upper() != "POST":
                continue  # a GET without parameters has nothing to get wrong
            strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
            check = given(case=strategy)(lambda case: _check_no_server_error(case, session))
            settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
                check)()


def test_the_server_still_answers_after_the_fuzzing(fuzzed_server):
    _, port = fuzzed_server
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-acme-1", max_retries=0) as client:
        reply = client.completions.create(model="acme-orders", prompt="hi", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
