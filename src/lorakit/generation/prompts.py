"""What generation and serving share: the chat prompt, left-padded batches, the end tokens."""

from __future__ import annotations

import torch
from torch import nn


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's chat template over ``messages``, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat prompt's token ids (the template already holds any special tokens it needs)."""
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, W), mask (B, W)) with every prompt ending in the last column, so that generation
    appends on the right of all rows alike; mask is 1 on prompt tokens, 0 on the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every token that ends a reply: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
