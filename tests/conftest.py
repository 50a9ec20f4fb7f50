"""Tiny models for the tests: an MLP, a small CNN (Conv2d and Conv1d), an embedding model,
and GPT-2 and Llama built from transformers configs with random weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT's save may look a base model up on the Hub

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.walk import lora_layers
from tasks import orders


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv2d layers (one strided, one dilated), then a Conv1d over the flattened positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2)
        self.seq_conv = nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (N, 8, 4, 4)
        h = torch.relu(self.seq_conv(h.flatten(2)))  # (N, 6, 16)
        return self.head(h.mean(-1))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


@dataclass
class Case:
    """A tiny model, an input for it, and what to target."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    targets: str | list[str]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def input(self, seed: int = 1) -> torch.Tensor:
        return self.make_input(torch.Generator().manual_seed(seed))

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out.logits if hasattr(out, "logits") else out


def random_tokens(g: torch.Generator) -> torch.Tensor:
    return torch.randint(3, 96, (2, 9), generator=g)


CASES = [
    Case("mlp", MLP, lambda g: torch.randn(4, 12, generator=g), "all-linear"),
    Case("cnn", CNN, lambda g: torch.randn(2, 3, 8, 8, generator=g), ["conv1", "conv2", "seq_conv", "head"]),
    Case("embedding", EmbeddingModel, lambda g: torch.randint(0, 50, (3, 7), generator=g), ["emb", "proj"]),
    Case("gpt2", tiny_gpt2, random_tokens, "all-linear"),
    Case("llama", tiny_llama, random_tokens, ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"]),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter non-zero A and B (fresh adapters have B = 0 and change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.lora.values():
                for p in (adapter.lora_A, adapter.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def injected(case: Case, r: int = 4, alpha: float = 8, **kwargs) -> nn.Module:
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=case.targets, **kwargs))
    randomize_adapters(model)
    return model


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer and chat template: from the embedded base (via lorakit's cache), or
    from the directory $LORAKIT_TEST_TOKENIZER names, on a machine without the embedded base."""
    directory = os.environ.get("LORAKIT_TEST_TOKENIZER")
    if directory:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    from lorakit.models.base import load_base

    return load_base()[1]


def write_orders_recipe(directory: Path, base: Path, name: str, **fields) -> Path:
    """A training recipe at ``directory / name`` on ``base`` over 16 train and 4 validation orders
    examples written beside it: r=4, 4 steps of 4 rows; ``fields`` add or override recipe keys."""
    orders.write_splits(directory, {"train": 16, "val": 4})
    settings = {"base": base, "train": directory / "train.jsonl", "val": directory / "val.jsonl", "r": 4,
                "max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, **fields}
    path = directory / name
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, smol_tokenizer):
    """A model directory holding a tiny random Llama with SmolLM2's tokenizer: what `--base DIR` reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.3)  # larger than default, so a few LoRA steps move the logits
    directory = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(directory)
    smol_tokenizer.save_pretrained(directory)
    return directory


def as_peft_writes_it(directory: Path) -> None:
    """Rewrite an adapter's weights file without lorakit's metadata, as PEFT writes it (so hand-made
    config edits are not caught as a mismatched pair, as they are in lorakit's own files)."""
    from safetensors.torch import load_file, save_file

    weights = Path(directory) / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
