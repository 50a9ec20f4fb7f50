"""LoRA as one of the methods: the core's inject, PEFT's file format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.inject import inject
from lorakit.core.layers.svd_init import is_svd_init
from lorakit.files.peft_format import (
    adapter_slots,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lorakit.methods.method import Method, MethodSettings

ADAPTER_NAME = "default"


class LoraMethod(Method):
    name = "lora"
    default_lr = 1e-3
    mergeable = True
    servable = True

    def __init__(self, config: LoraConfig | None = None) -> None:
        self.config = config

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        if self.config is None:
            raise ValueError("LoRA trains with a LoraConfig: method_named('lora', config)")
        config = self.config.replace(base_model_name_or_path=str(getattr(model, "name_or_path", "") or ""))
        return inject(model, config, name=ADAPTER_NAME)

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return adapter_slots(model, ADAPTER_NAME)

    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        return save_adapter(model, directory, ADAPTER_NAME, tensors=tensors)

    def saves_slots(self, model: nn.Module) -> bool:
        # A PiSSA/OLoRA adapter's file is converted for the untouched base (rank 2r): a checkpoint
        # keeps the matrices that train beside it.
        return self.config is None or not is_svd_init(self.config.init)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return read_adapter(directory).tensors

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        return load_adapter(model, directory)
