"""A tiny base model served on 127.0.0.1 with four adapters and two tenants, for the server tests."""

import hashlib
from contextlib import contextmanager

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.serve.app import create_app, start_service
from lorakit.serve.server import ConnectionLimits, make_server, serving_in_background
from lorakit.serve.tenants import Tenants
from tests.conftest import randomize_adapters

TENANTS = """
admin_key: "admin-secret-key"
tenants:
  acme:
    api_keys: ["sk-acme-1"]
    adapters: ["acme-orders", "acme-support", "acme-extra"]
  globex:
    api_keys: ["sha256:{globex_digest}"]
    adapters: ["globex-orders"]
"""


def _save_adapter(base_dir, directory, r, seed):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=r, target_modules="all-linear"))
    randomize_adapters(model, seed=seed, std=0.3)
    lorakit.save_adapter(model, directory)


@contextmanager
def running_server(base_dir, adapters: dict, tenants_file=None, adapter_root=None,
                   connections: ConnectionLimits | None = None, **service_options):
    """A Service over a tiny base model with ``adapters`` (name -> directory), served on 127.0.0.1:
    yields (service, port)."""
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tenants = Tenants.from_yaml(tenants_file) if tenants_file else None
    service = start_service(model, tokenizer, adapters, tenants, adapter_root, **service_options)
    server = make_server(create_app(service), "127.0.0.1", 0, service.limits.max_body_bytes,
                         connections or ConnectionLimits())
    try:
        with serving_in_background(server) as port:
            yield service, port
    finally:
        service.engine.stop()


@pytest.fixture(scope="module")
def adapter_root(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, r) in enumerate({"acme-orders": 4, "acme-support": 8, "globex-orders": 2, "acme-extra": 4}.items()):
        _save_adapter(tiny_base_dir, root / name, r, seed)
    return root


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(TENANTS.format(globex_digest=hashlib.sha256(b"sk-globex-1").hexdigest()))
    return path


@pytest.fixture(scope="module")
def server(tiny_base_dir, adapter_root, tenants_file):
    adapters = {n: adapter_root / n for n in ("acme-orders", "acme-support", "globex-orders")}
    with running_server(tiny_base_dir, adapters, tenants_file, adapter_root) as (service, port):
        yield service, port, adapter_root
