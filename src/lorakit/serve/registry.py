"""Adapters by name over one base model: registered from directories, loaded on demand, evicted
least-recently-used when the loaded ones outgrow a byte budget.

An adapter for serving is checked harder than one for training: safetensors only (never a pickle),
its config parsed as data, every tensor's name and shape checked against the model, no NaN or
infinite values, a rank cap, and nothing that would change what other tenants see (trained
biases, whole-module copies, replaced embeddings). An adapter in use by running requests is never
evicted or unloaded.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import delete_adapter
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.peft_format import load_adapter, read_adapter_header
from lorakit.walk import lora_layers

SAFE_DTYPES = {"F32", "F16", "BF16"}


@dataclass
class AdapterInfo:
    name: str
    directory: Path
    rank: int
    bytes: int  # in memory, once loaded
    loaded: bool = False
    in_use: int = 0  # running requests
    load_ms: float = 0.0  # the last load


class AdapterRegistry:
    def __init__(self, model: nn.Module, budget_bytes: int = 1 << 30, max_rank: int = 256,
                 lock: threading.RLock | None = None) -> None:
        self.model = model
        self.budget_bytes = budget_bytes
        self.max_rank = max_rank
        self.lock = lock or threading.RLock()  # the engine's: no adapter changes while a batch runs
        self._adapters: dict[str, AdapterInfo] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self._base_name = str(getattr(model, "name_or_path", "") or "")

    # --- names --------------------------------------------------------------------------------

    def register(self, name: str, directory: str | Path, load: bool = True) -> AdapterInfo:
        """Check ``directory``'s adapter (header and config, without reading its tensors) and give it ``name``."""
        _check_name(name)
        with self.lock:
            if name in self._adapters:
                raise ConfigError(f"an adapter named {name!r} is already registered; unload it first")
            config, header, _ = read_adapter_header(directory)
            if config.modules_to_save or config.bias != "none":
                raise AdapterFileError(f"{directory}: trains {'whole modules' if config.modules_to_save else 'biases'}, "
                                       "which would change the base model for every tenant; serving takes LoRA matrices only")
            recorded = config.base_model_name_or_path
            if recorded and self._base_name and recorded != self._base_name:
                raise AdapterFileError(f"{directory}: trained on {recorded}, but this server's base model is "
                                       f"{self._base_name}")
            ranks = [shape[0] for key, (shape, _) in header.items() if ".lora_A" in key or "lora_embedding_A" in key]
            bad = [key for key, (_, dtype) in header.items() if dtype not in SAFE_DTYPES or "lora_" not in key]
            if bad:
                raise AdapterFileError(f"{directory}: tensor {bad[0]!r} is not a LoRA matrix in float32/16 or bfloat16")
            if not ranks:
                raise AdapterFileError(f"{directory}: holds no LoRA matrices")
            if max(ranks) > self.max_rank:
                raise AdapterFileError(f"{directory}: rank {max(ranks)} is above this server's limit of {self.max_rank}")
            size = sum(4 * math.prod(shape) for shape, _ in header.values())  # held in float32
            info = AdapterInfo(name, Path(directory), max(ranks), size)
            self._adapters[name] = info
            if load:
                try:
                    self.acquire(name)
                except Exception:
                    del self._adapters[name]
                    raise
                self.release(name)
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

    # --- the engine's hooks -------------------------------------------------------------------

    def acquire(self, name: str) -> None:
        """Make ``name`` ready in the model for one more request, loading it if it was evicted."""
        with self.lock:
            info = self._get(name)
            if not info.loaded:
                self._make_room(info.bytes)
                start = time.perf_counter()
                load_adapter(self.model, info.directory, name=name, activate=False)
                self._check_finite(name)
                info.load_ms = 1000 * (time.perf_counter() - start)
                info.loaded = True
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

    def _check_finite(self, name: str) -> None:
        for path, layer in lora_layers(self.model):
            if name not in layer.lora:
                continue
            adapter = layer.lora[name]
            if not all(torch.isfinite(p).all() for p in (adapter.lora_A, adapter.lora_B)):
                delete_adapter(self.model, name)
                raise AdapterFileError(f"{self._adapters[name].directory}: {path} holds NaN or infinite values")


def _check_name(name: str) -> None:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.:" for c in name) or name.startswith("."):
        raise ConfigError(f"adapter name {name!r}: use 1-128 letters, digits, '-', '_', '.', ':'")
