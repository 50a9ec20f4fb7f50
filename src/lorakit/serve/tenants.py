"""Who may use which adapter: API keys mapped to tenants, each with its own adapters.

The file (YAML) holds keys as given or as ``sha256:<hex>`` of the key, so it need not hold a
secret. Keys are compared as SHA-256 digests. A tenant that asks for another tenant's adapter is
told exactly what it would be told for an adapter that does not exist. Each tenant may hold at
most ``max_requests`` requests at once, running and waiting (the file's top-level
``max_requests`` is the default for tenants that give none).

    admin_key: "sha256:9f86d0..."
    max_requests: 64
    tenants:
      acme:
        api_keys: ["sk-acme-1"]
        adapters: ["acme-orders"]
        max_requests: 16
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.serve.names import is_adapter_name

DEFAULT_MAX_REQUESTS = 64


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: frozenset[str]
    max_requests: int = DEFAULT_MAX_REQUESTS  # running and waiting at once


class Tenants:
    def __init__(self, by_digest: dict[str, Tenant], admin_digest: str | None) -> None:
        self._by_digest = by_digest
        self._admin_digest = admin_digest

    @classmethod
    def from_yaml(cls, path: str | Path) -> Tenants:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the tenants file ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
            raise ConfigError(f"{path}: expected a mapping with 'tenants:' (and optionally 'admin_key:')")
        unknown = set(data) - {"tenants", "admin_key", "max_requests"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; the file holds 'tenants', 'admin_key' "
                              "and 'max_requests'")
        default_limit = _limit(data.get("max_requests", DEFAULT_MAX_REQUESTS), "max_requests", path)
        by_digest: dict[str, Tenant] = {}
        for name, entry in data["tenants"].items():
            entry = entry if isinstance(entry, dict) else {}
            extra = set(entry) - {"api_keys", "adapters", "max_requests"}
            if extra:
                raise ConfigError(f"{path}: tenant {name!r} has unknown key(s) {sorted(extra)}; a tenant holds "
                                  "'api_keys', 'adapters' and 'max_requests'")
            keys, adapters = entry.get("api_keys"), entry.get("adapters", [])
            if not isinstance(keys, list) or not keys or not isinstance(adapters, list):
                raise ConfigError(f"{path}: tenant {name!r} needs 'api_keys: [...]' (at least one) and 'adapters: [...]'")
            bad = [a for a in adapters if not is_adapter_name(a)]
            if bad:
                raise ConfigError(f"{path}: tenant {name!r}: {bad[0]!r} is not an adapter name (1-128 ASCII letters, "
                                  "digits, '-', '_', '.', ':')")
            limit = _limit(entry.get("max_requests", default_limit), f"tenant {name!r}: max_requests", path)
            tenant = Tenant(str(name), frozenset(adapters), limit)
            for key in keys:
                digest = _digest_of(str(key), path)
                if digest in by_digest:
                    raise ConfigError(f"{path}: an API key of tenant {name!r} is also given to {by_digest[digest].name!r}")
                by_digest[digest] = tenant
        admin = data.get("admin_key")
        return cls(by_digest, _digest_of(str(admin), path) if admin else None)

    def tenant(self, key: str | None) -> Tenant | None:
        """The tenant an API key belongs to; None for a missing or unknown key."""
        return self._by_digest.get(_sha256(key)) if key else None

    def is_admin(self, key: str | None) -> bool:
        return bool(key) and self._admin_digest is not None and _sha256(key) == self._admin_digest

    def adapters(self) -> set[str]:
        return {a for t in self._by_digest.values() for a in t.adapters}


def _limit(value: object, what: str, path: str | Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {what} must be a whole number of at least 1, not {value!r}")
    return value


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _digest_of(key: str, path: str | Path) -> str:
    if key.startswith("sha256:"):
        digest = key.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{path}: 'sha256:' must be followed by 64 hex digits")
        return digest
    if len(key) < 8:
        raise ConfigError(f"{path}: API keys must be at least 8 characters")
    return _sha256(key)
