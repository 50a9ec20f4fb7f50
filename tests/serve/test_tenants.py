"""The tenants file: keys as given or as sha256 digests, and clear errors for a bad file."""

import hashlib
import re
from pathlib import Path

import pytest

import lorakit
from lorakit.serve.tenants import Tenants


def _tenants(tmp_path, text):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return Tenants.from_yaml(path)


def test_plain_and_hashed_keys_find_their_tenant(tmp_path):
    digest = hashlib.sha256(b"sk-globex-1").hexdigest()
    tenants = _tenants(tmp_path, f"""
admin_key: "sha256:{hashlib.sha256(b'admin-key-123').hexdigest()}"
tenants:
  acme: {{api_keys: ["sk-acme-1"], adapters: ["a1", "a2"]}}
  globex: {{api_keys: ["sha256:{digest.upper()}"], adapters: ["g1"]}}
""")
    assert tenants.tenant("sk-acme-1").adapters == {"a1", "a2"}
    assert tenants.tenant("sk-globex-1").name == "globex"
    assert tenants.tenant("sk-nobody-1") is None and tenants.tenant(None) is None
    assert tenants.is_admin("admin-key-123") and not tenants.is_admin("sk-acme-1")


@pytest.mark.parametrize(("text", "words"), [
    ("tenants: [1, 2]", "expected a mapping"),
    ("tenants: {a: {api_keys: []}}", "at least one"),
    ("tenants: {a: {api_keys: [short]}}", "at least 8 characters"),
    ("tenants: {a: {api_keys: ['sha256:abc']}}", "64 hex digits"),
    ("tenants: {a: {api_keys: [sk-same-key]}, b: {api_keys: [sk-same-key]}}", "also given to"),
    ("tenant: {}", "expected a mapping"),
    ("tenants: {}\nadmin: x", "unknown key"),
    ("tenants: {a: [", "cannot read"),
])
def test_a_bad_tenants_file_is_one_clear_error(tmp_path, text, words):
    with pytest.raises(lorakit.ConfigError, match=words):
        _tenants(tmp_path, text)


def test_the_readmes_tenants_files_parse(tmp_path):
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL) if "tenants:" in b]
    assert len(blocks) == 2
    for block in blocks:
        tenants = _tenants(tmp_path, block)
        assert tenants.is_admin("change-me-admin-key")
    assert tenants.tenant("sk-acme-1").max_requests == 16


def test_tenants_limits_and_adapter_names_are_checked(tmp_path):
    tenants = _tenants(tmp_path, "max_requests: 5\ntenants:\n  a: {api_keys: [sk-a-12345], adapters: [x]}\n"
                                 "  b: {api_keys: [sk-b-12345], adapters: [y], max_requests: 2}\n")
    assert tenants.tenant("sk-a-12345").max_requests == 5 and tenants.tenant("sk-b-12345").max_requests == 2
    for text, words in [("tenants: {a: {api_keys: [sk-a-12345], adapters: ['../x']}}", "not an adapter name"),
                        ("tenants: {a: {api_keys: [sk-a-12345], max_requests: 0}}", "at least 1"),
                        ("max_requests: true\ntenants: {}", "whole number"),
                        ("tenants: {a: {api_keys: [sk-a-12345], adapter: [x]}}", "unknown key")]:
        with pytest.raises(lorakit.ConfigError, match=words):
            _tenants(tmp_path, text)
