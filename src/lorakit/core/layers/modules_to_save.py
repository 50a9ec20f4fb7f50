"""Modules trained in full beside the adapters (a new classifier head, say).

Each adapter that names the module gets its own trainable copy; the original stays frozen and
is what runs when no such adapter is active or adapters are disabled. In a file the copy's
tensors use the module's own names (``<path>.weight``), as PEFT writes them.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Wraps a module: ``original_module`` plus one copy per adapter in ``modules_to_save``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.lora_disabled = False

    def add_copy(self, name: str) -> nn.Module:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        return self.modules_to_save[name]

    def delete_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, else the original."""
        if self.lora_disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
