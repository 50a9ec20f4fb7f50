"""The one rule for adapter names, wherever a name comes from: --adapter, the tenants file, an
admin's load request. A name is what clients send as ``model``, and it appears in metrics labels
and logs, so it stays short and plain."""

from __future__ import annotations

from lorakit.errors import ConfigError

MAX_NAME_CHARS = 128
_ALLOWED_PUNCTUATION = "-_.:"


def is_adapter_name(name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and not name.startswith(".")
            and all((c.isascii() and c.isalnum()) or c in _ALLOWED_PUNCTUATION for c in name))


def check_adapter_name(name: object) -> None:
    if not is_adapter_name(name):
        raise ConfigError(f"adapter name {name!r}: use 1-{MAX_NAME_CHARS} ASCII letters, digits, '-', '_', '.', "
                          "':', not starting with '.'")
