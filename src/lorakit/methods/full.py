"""Full fine-tuning: every weight trains, and what is saved is a whole model directory.

The reference the other methods are measured against. The training loop's choices still apply
(loss on assistant tokens, gradient checkpointing, bf16 base). A tied output head (SmolLM2's
``lm_head`` is ``embed_tokens``) trains as the one tensor it is and is stored once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.files.atomic import atomic_path, fsync_directory
from lorakit.files.peft_format import finite_copies
from lorakit.methods.method import Method, MethodSettings

WEIGHTS = "model.safetensors"


class FullFineTuning(Method):
    name = "full"
    default_lr = 5e-5
    mergeable = True  # nothing to merge: the result is the model
    servable = True  # as a base: lorakit serve --base DIR

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())  # a tied weight once, under its first name

    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        """A model directory lorakit and transformers load (config, tokenizer, model.safetensors); the
        weights are written last and atomically, so a directory with them is complete."""
        slots = self.slots(model)
        tensors = {k: p.detach() for k, p in slots.items()} if tensors is None else tensors
        tensors = finite_copies(tensors, "the model")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        with atomic_path(directory / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        fsync_directory(directory)
        return directory

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(Path(directory) / WEIGHTS))
        except (SafetensorError, OSError) as err:
            raise AdapterFileError(f"{directory}/{WEIGHTS}: unreadable ({err}); it is missing, truncated or "
                                   "corrupt") from None

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        raise AdapterFileError(f"{directory} is a whole model (full fine-tuning); load it as the base: --base {directory}")
