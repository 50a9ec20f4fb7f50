"""Where lorakit keeps what it derives once and reuses: converted base models, built kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LORAKIT_CACHE``, default ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")
