"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a block.

``h + up(relu(down(h)))`` on the output ``h`` of each decoder layer's feed-forward block (Pfeiffer's
placement) and, with ``adapter_placement: both``, of its attention block too (Houlsby's). ``up``
starts at zero, so the model starts unchanged. The ReLU between the projections is what makes it
more than a low-rank update, and also why it cannot be merged into the weights: it adds two small
matmuls to every layer at inference, for good.

PEFT has no bottleneck adapters, so the file is lorakit's own, in the same two-file layout:
adapter_config.json with ``peft_type: LORAKIT_BOTTLENECK`` and adapter_model.safetensors with keys
``<block path>.adapter_down.weight`` (size, hidden) and ``.adapter_up.weight`` (hidden, size), biases too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.peft_format import read_adapter_files, write_adapter_files
from lorakit.methods.method import (
    OFF,
    Method,
    MethodSettings,
    check_shapes,
    fill_slots,
    is_off,
)

PEFT_TYPE = "LORAKIT_BOTTLENECK"
PLACEMENTS = {"ffn": ("mlp",), "both": ("self_attn", "mlp")}


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, device: torch.device) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(hidden, size, device=device)  # (size, hidden)
        self.adapter_up = nn.Linear(size, hidden, device=device)  # (hidden, size)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        setattr(self, OFF, False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        update = self.adapter_up(torch.relu(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return h + update.to(h.dtype)


def _after_block(block: nn.Module, args: tuple, output):
    if is_off(block.bottleneck):
        return output
    # Attention blocks return (output, attention weights); feed-forward blocks a tensor.
    if isinstance(output, tuple):
        return (block.bottleneck(output[0]), *output[1:])
    return block.bottleneck(output)


def _blocks(model: nn.Module, placement: str) -> list[tuple[str, nn.Module]]:
    if placement not in PLACEMENTS:
        raise ConfigError(f"adapter_placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    names = PLACEMENTS[placement]
    found = [(path, m) for path, m in model.named_modules() if path.rsplit(".", 1)[-1] in names
             and ".layers." in f".{path}"]
    if not found:
        raise ConfigError("bottleneck adapters go after decoder layers' self_attn / mlp blocks; this model has none")
    return found


class BottleneckAdapters(Method):
    name = "adapter"
    default_lr = 1e-3
    mergeable = False
    servable = False

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        if settings.adapter_size < 1:
            raise ConfigError("adapter_size must be at least 1")
        return self._attach(model, settings.adapter_size, settings.adapter_placement)

    def _attach(self, model: nn.Module, size: int, placement: str) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        hidden = model.config.hidden_size
        device = next(model.parameters()).device
        for _, block in _blocks(model, placement):
            block.add_module("bottleneck", Bottleneck(hidden, size, device))
            block.register_forward_hook(_after_block)
        model._lorakit_bottleneck = {"adapter_size": size, "adapter_placement": placement}
        return model

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if ".bottleneck." in name}

    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        tensors = {k: p.detach() for k, p in self.slots(model).items()} if tensors is None else tensors
        config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "nonlinearity": "relu",
                  "base_model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
                  **model._lorakit_bottleneck}
        return write_adapter_files(directory, config, tensors)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        data, tensors, _ = read_adapter_files(directory)
        size, placement = data.get("adapter_size"), data.get("adapter_placement")
        if not isinstance(size, int) or size < 1 or placement not in PLACEMENTS or data.get("nonlinearity") != "relu":
            raise AdapterFileError(f"{directory}: adapter_config.json needs adapter_size (a positive integer), "
                                   f"adapter_placement ({' or '.join(PLACEMENTS)}) and nonlinearity relu")
        hidden = model.config.hidden_size
        want = {}
        for path, _ in _blocks(model, placement):
            for part, shape in (("adapter_down", (size, hidden)), ("adapter_up", (hidden, size))):
                want[f"{path}.bottleneck.{part}.weight"] = shape
                want[f"{path}.bottleneck.{part}.bias"] = shape[:1]
        check_shapes(directory, tensors, want)
        self._attach(model, size, placement)
        fill_slots(self.slots(model), tensors)
        return model
