"""A tiny base model served on 127.0.0.1 with four adapters and two tenants, for the server tests."""

import hashlib
import threading

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.serve.http import make_server, start_app
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


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, r) in enumerate({"acme-orders": 4, "acme-support": 8, "globex-orders": 2, "acme-extra": 4}.items()):
        _save_adapter(tiny_base_dir, root / name, r, seed)
    tenants_file = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants_file.write_text(TENANTS.format(globex_digest=hashlib.sha256(b"sk-globex-1").hexdigest()))
    model = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    app = start_app(model, tokenizer, {n: root / n for n in ("acme-orders", "acme-support", "globex-orders")},
                    Tenants.from_yaml(tenants_file), adapter_root=root)
    httpd = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield app, httpd.server_address[1], root
    httpd.shutdown()
    app.engine.stop()
