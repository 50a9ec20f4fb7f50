"""The shape every training method has, and the registry of them by name.

A method attaches to a base model (changing which tensors train), names those tensors by the key
they have in its file (``slots``: what the optimizer updates, checkpoints hold and the file
stores), writes that file and reads it back. The training loop sees only this, so every method
trains with the same data, batches, loss, optimizer, schedule and checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.peft_format import CONFIG_NAME, adapter_kind, read_adapter_files


@dataclass(frozen=True)
class MethodSettings:
    """The settings methods other than LoRA read (LoRA's are its LoraConfig)."""

    num_virtual_tokens: int = 20  # prompt and prefix tuning: virtual tokens before every input
    adapter_size: int = 64  # bottleneck adapters: the width of the bottleneck
    adapter_placement: str = "ffn"  # bottleneck adapters: after the FFN (Pfeiffer) or "both" (Houlsby)
    prefix_projection: int = 0  # prefix tuning: hidden width of the MLP that makes the prefix (0: none)
    seed: int = 0


class Method:
    """One way to adapt a model. Subclasses fill in the class attributes and the four methods."""

    name: ClassVar[str]
    default_lr: ClassVar[float]  # a learning rate that works for it on small models with AdamW
    mergeable: ClassVar[bool]  # whether it can be folded into the base weights (no added latency)
    servable: ClassVar[bool]  # whether `lorakit serve` serves its files beside LoRA adapters

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        """Make the model trainable this way: new tensors initialised so the model is unchanged
        (or, for prompts, starts from real token embeddings), everything else frozen."""
        raise NotImplementedError

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """File key -> the Parameter it holds, for every tensor that trains, in a fixed order."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        """Write what trained to ``directory``; ``tensors`` (by file key) replaces the model's own.
        ``tokenizer`` goes with what is a whole model (full fine-tuning)."""
        raise NotImplementedError

    def saves_slots(self, model: nn.Module) -> bool:
        """Whether ``save`` writes the slots themselves (else a checkpoint keeps them beside the file)."""
        return True

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The tensors a saved directory holds, by file key (for resuming); here, an adapter directory's."""
        return read_adapter_files(directory)[1]

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """A base model with the saved ``directory`` applied, for inference."""
        raise NotImplementedError


def check_shapes(directory: Path, tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> None:
    """A file's tensors against the keys and shapes this model needs, before anything changes."""
    got = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    if got != want:
        wrong = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise AdapterFileError(f"{directory}: its tensors do not fit this model (e.g. {wrong}); was it made for a "
                               "different base?")


@torch.no_grad()
def fill_slots(slots: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for key, param in slots.items():
        param.copy_(tensors[key])


def method_named(name: str, lora_config: LoraConfig | None = None) -> Method:
    """The method called ``name``; LoRA trains with ``lora_config``."""
    # Imported here, not above: each of them imports this module.
    from lorakit.methods import bottleneck, full, ia3, lora, virtual_tokens

    methods = {m.name: m for m in (lora.LoraMethod(lora_config), full.FullFineTuning(), ia3.IA3(),
                                   virtual_tokens.PromptTuning(), virtual_tokens.PrefixTuning(),
                                   bottleneck.BottleneckAdapters())}
    if name not in methods:
        raise ConfigError(f"method must be one of {', '.join(METHOD_NAMES)}; got {name!r}")
    return methods[name]


METHOD_NAMES = ("lora", "full", "prompt", "prefix", "ia3", "adapter")


# Set on a module whose hook applies a method (IA³ scaling, virtual tokens, a bottleneck): while True,
# the hook does nothing and the module computes what the base model does.
OFF = "_lorakit_method_off"


def is_off(module: nn.Module) -> bool:
    return getattr(module, OFF, False)


@contextmanager
def methods_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: every non-LoRA method's hook stands aside (LoRA's
    layers have their own switch, lorakit.disable_adapters)."""
    hooked = [m for m in model.modules() if hasattr(m, OFF)]
    for module in hooked:
        setattr(module, OFF, True)
    try:
        yield model
    finally:
        for module in hooked:
            setattr(module, OFF, False)


# peft_type in adapter_config.json -> method; a model directory (config.json, no adapter_config.json)
# is what full fine-tuning writes.
_KINDS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix",
          "LORAKIT_BOTTLENECK": "adapter"}


def method_of_directory(directory: str | Path) -> Method:
    """The method whose files ``directory`` holds, with a clear error for anything else."""
    path = Path(directory)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (path / "config.json").is_file():
        return method_named("full")
    kind = adapter_kind(path)
    if kind not in _KINDS:
        raise AdapterFileError(f"{path}: peft_type {kind!r} is not one lorakit reads; it reads "
                               f"{', '.join(sorted(_KINDS))} adapters and full model directories")
    return method_named(_KINDS[kind])
