"""Adapters by name over one base model: registered from directories, loaded on demand, evicted
least-recently-used when the loaded ones outgrow a byte budget.

An adapter for serving is checked harder than one for training, at its first load and again at
every reload after an eviction (its files may have been replaced since): each file is read once
into memory and those bytes are what is checked and then applied. Safetensors only (never a
pickle), the config parsed as data and recorded for this server's base model, LoRA matrices only
(no trained biases, whole-module copies or replaced base weights: they would change what other
tenants see), float32/16 or bfloat16, a rank cap, every name and shape checked against the model,
and no NaN or infinite values. A failed reload fails the requests that needed that adapter with a
message free of server paths; the details go to the server's log. An adapter in use by running
requests is never evicted or unloaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.core.adapters import delete_adapter
from lorakit.core.checks import first_non_finite
from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.files.peft_format import (
    AdapterFiles,
    adapter_kind,
    load_adapter,
    read_adapter,
    split_adapter_key,
)
from lorakit.serve.names import check_adapter_name

SAFE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

log = logging.getLogger("lorakit.serve")


class AdapterUnavailable(LorakitError):
    """A registered adapter could not be loaded again (its files changed or went bad)."""


@dataclass
class AdapterInfo:
    name: str
    directory: Path
    rank: int
    bytes: int  # in memory, once loaded (float32)
    loaded: bool = False
    in_use: int = 0  # running requests
    load_ms: float = 0.0  # the last load


# Called after each attempt to load an adapter: (name, milliseconds, None or the error).
LoadHook = Callable[[str, float, Exception | None], None]


class AdapterRegistry:
    def __init__(self, model: nn.Module, budget_bytes: int = 1 << 30, max_rank: int = 256,
                 lock: threading.RLock | None = None, on_load: LoadHook | None = None) -> None:
        self.model = model
        self.budget_bytes = budget_bytes
        self.max_rank = max_rank
        self.lock = lock or threading.RLock()  # the engine's: no adapter changes while a batch runs
        self.on_load = on_load
        self._adapters: dict[str, AdapterInfo] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self._base_name = str(getattr(model, "name_or_path", "") or "")
        self._max_file_bytes = _largest_adapter_bytes(model, max_rank)

    # --- names --------------------------------------------------------------------------------

    def register(self, name: str, directory: str | Path, load: bool = True) -> AdapterInfo:
        """Check ``directory``'s adapter (every tensor, read once) and give it ``name``; loaded now
        unless ``load`` is false."""
        check_adapter_name(name)
        with self.lock:
            if name in self._adapters:
                raise ConfigError(f"an adapter named {name!r} is already registered; unload it first")
            files, rank, size = self._read_checked(Path(directory))
            info = AdapterInfo(name, Path(directory), rank, size)
            self._adapters[name] = info
            if load:
                try:
                    self._load(info, files)
                except Exception:
                    del self._adapters[name]
                    raise
            return info

    def unregister(self, name: str) -> None:
        """Forget ``name`` (unloading it); refused while requests use it."""
        with self.lock:
            info = self._get(name)
            if info.in_use:
                raise ConfigError(f"adapter {name!r} is in use by {info.in_use} running request(s); try again when "
                                  "they finish")
            if info.loaded:
                self._evict(name)
            del self._adapters[name]

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        return self._get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    @property
    def loaded_bytes(self) -> int:
        return sum(self._adapters[n].bytes for n in self._lru)

    @property
    def loaded_count(self) -> int:
        return len(self._lru)

    # --- the engine's hooks -------------------------------------------------------------------

    def acquire(self, name: str) -> None:
        """Make ``name`` ready in the model for one more request, loading (and checking) it again if
        it was evicted. AdapterUnavailable if its files no longer pass."""
        with self.lock:
            info = self._get(name)
            if not info.loaded:
                try:
                    files, info.rank, info.bytes = self._read_checked(info.directory)
                except LorakitError as err:
                    log.warning("adapter %r failed its checks on reload from %s: %s", name, info.directory, err)
                    self._report(name, 0.0, err)
                    raise AdapterUnavailable(f"adapter {name!r} could not be loaded: its files failed the server's "
                                             "checks; the operator can see why in the server's log") from None
                self._load(info, files)
            info.in_use += 1
            self._lru[name] = None
            self._lru.move_to_end(name)

    def release(self, name: str) -> None:
        with self.lock:
            if name in self._adapters:
                self._adapters[name].in_use = max(0, self._adapters[name].in_use - 1)

    # --- internals ----------------------------------------------------------------------------

    def _get(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            raise KeyError(name)
        return self._adapters[name]

    def _read_checked(self, directory: Path) -> tuple[AdapterFiles, int, int]:
        """(the adapter's files as read, its rank, its bytes in memory), or AdapterFileError."""
        kind = adapter_kind(directory)
        if kind != "LORA":
            raise AdapterFileError(f"{directory}: a {kind} adapter; lorakit serve batches LoRA adapters only (merge an "
                                   "IA3 adapter into the base with lorakit merge and serve that as --base; prompt, "
                                   "prefix and bottleneck adapters cannot be served)")
        files = read_adapter(directory, max_bytes=self._max_file_bytes)
        config, tensors = files.config, files.tensors
        if config.modules_to_save or config.bias != "none":
            raise AdapterFileError(f"{directory}: trains {'whole modules' if config.modules_to_save else 'biases'}, "
                                   "which would change the base model for every tenant; serving takes LoRA matrices only")
        recorded = config.base_model_name_or_path
        if recorded and self._base_name and recorded != self._base_name:
            raise AdapterFileError(f"{directory}: trained on {recorded}, but this server's base model is "
                                   f"{self._base_name}")
        ranks = []
        for key, tensor in tensors.items():
            _, part, _ = split_adapter_key(key)
            if part is None or tensor.dtype not in SAFE_DTYPES:
                raise AdapterFileError(f"{directory}: tensor {key!r} is not a LoRA matrix in float32/16 or bfloat16")
            if part == "A":
                ranks.append(tensor.shape[0])
        bad = first_non_finite(tensors)
        if bad is not None:
            raise AdapterFileError(f"{directory}: {bad} holds NaN or infinite values")
        if not ranks:
            raise AdapterFileError(f"{directory}: holds no LoRA matrices")
        if max(ranks) > self.max_rank:
            raise AdapterFileError(f"{directory}: rank {max(ranks)} is above this server's limit of {self.max_rank}")
        size = sum(4 * t.numel() for t in tensors.values())  # held in float32
        return files, max(ranks), size

    def _load(self, info: AdapterInfo, files: AdapterFiles) -> None:
        """Apply checked ``files`` as adapter ``info.name`` (names and shapes are checked against the
        model here; a failure leaves the model as it was)."""
        self._make_room(info.bytes)
        start = time.perf_counter()
        try:
            load_adapter(self.model, files, name=info.name, activate=False)
        except LorakitError as err:
            self._report(info.name, 0.0, err)
            raise AdapterFileError(f"{info.directory}: {err}") from None
        info.load_ms = 1000 * (time.perf_counter() - start)
        info.loaded = True
        self._lru[info.name] = None
        self._report(info.name, info.load_ms, None)

    def _report(self, name: str, ms: float, error: Exception | None) -> None:
        if self.on_load is not None:
            self.on_load(name, ms, error)

    def _make_room(self, needed: int) -> None:
        for name in list(self._lru):
            if self.loaded_bytes + needed <= self.budget_bytes:
                return
            if self._adapters[name].in_use == 0:
                self._evict(name)
        if self.loaded_bytes + needed > self.budget_bytes:
            raise ConfigError(f"no room for another adapter: {self.loaded_bytes} of {self.budget_bytes} bytes are "
                              "held by adapters in use; raise the adapter memory budget")

    def _evict(self, name: str) -> None:
        delete_adapter(self.model, name)
        self._adapters[name].loaded = False
        self._lru.pop(name, None)


def _largest_adapter_bytes(model: nn.Module, max_rank: int) -> int:
    """An upper bound on the file of any adapter of rank <= ``max_rank`` for ``model``: float32 A and
    B on every weight, (out, rest...) -> r * (prod(rest) + out) numbers, plus room for the header.
    A file above it is refused before it is read whole."""
    numbers = sum(max_rank * (p.numel() // p.shape[0] + p.shape[0]) for p in model.parameters() if p.dim() >= 2)
    return 4 * numbers + (1 << 20)
