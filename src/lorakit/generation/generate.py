"""Text generation with a base model and (optionally) an adapter, for eval, generate and chat.

Batches are left-padded (generation appends on the right) and built from prompts of similar
length; greedy decoding unless a temperature is given.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit.data.tokenize import padding_id
from lorakit.generation.copy_constraint import CopyFieldRows
from lorakit.generation.json_constraint import JsonObjectRows
from lorakit.generation.prompts import left_padded


def cannot_be_json_object(head: str) -> bool:
    """Whether an answer that begins with ``head`` can never parse as a JSON object."""
    return bool(head.strip()) and not head.lstrip().startswith("{")


class StopUnlessJsonObject:
    """A stopping criterion: a row stops as soon as its answer's first non-blank character is not "{",
    because such an answer can never parse as a JSON object. Scoring against JSON references is
    unchanged by it (the answer was a miss either way); a base model that would ramble for 50 tokens
    stops after one. ``answer_starts[row]`` is the column where that row's answer begins."""

    LOOK_AHEAD = 4  # tokens decoded to find the first non-blank character

    def __init__(self, tokenizer, answer_starts: list[int]) -> None:
        self.tokenizer = tokenizer
        self.answer_starts = answer_starts

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        heads = self.tokenizer.batch_decode([input_ids[row, start:start + self.LOOK_AHEAD]
                                             for row, start in enumerate(self.answer_starts)],
                                            skip_special_tokens=True)
        return torch.tensor([cannot_be_json_object(h) for h in heads], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   temperature: float = 0.0, top_p: float = 1.0, progress: bool = False, streamer=None,
                   json_only: bool = False, json_object: bool = False,
                   copy_fields: frozenset[str] = frozenset()) -> list[str]:
    """The continuation of each prompt (special tokens removed), in the prompts' order. With
    ``json_only``, a continuation that cannot become a JSON object is cut short (StopUnlessJsonObject);
    with ``json_object``, decoding is constrained so that every continuation is one JSON object; the
    values of ``copy_fields`` are spans of the prompt (generation/copy_constraint.py)."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new_tokens = generate_ids(model, tokenizer, encoded, max_new_tokens, batch_size, temperature, top_p, progress,
                              streamer, json_only, json_object=json_object, copy_fields=copy_fields)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, progress: bool = False, streamer=None,
                 json_only: bool = False, answered: list[int] | None = None,
                 json_object: bool = False, copy_fields: frozenset[str] = frozenset()) -> list[list[int]]:
    """The new token ids after each prompt, in the prompts' order. ``answered[i]``: how many of prompt
    i's last tokens are already part of its answer (for ``json_only``, which looks at the answer's head,
    and ``json_object`` and ``copy_fields``, which constrain the whole answer); the rest of the prompt
    is the text ``copy_fields`` copy from."""
    device = next(model.parameters()).device
    pad_id = padding_id(tokenizer)
    answered = answered or [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    outputs: list[list[int]] = [[] for _ in prompts]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", file=sys.stderr, leave=False)
    for rows in batches:
        ids, mask = left_padded([prompts[i] for i in rows], pad_id)
        width = ids.shape[1]
        answer_starts = [width - answered[i] for i in rows]
        stop = [StopUnlessJsonObject(tokenizer, answer_starts)] if json_only and not json_object else None
        allowed = JsonObjectRows(tokenizer, answer_starts) if json_object else None
        copied = [CopyFieldRows(tokenizer, copy_fields, [tokenizer.decode(prompts[i][:len(prompts[i]) - answered[i]])
                                                         for i in rows], answer_starts)] if copy_fields else None
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                                   stopping_criteria=stop, prefix_allowed_tokens_fn=allowed,
                                   logits_processor=copied, **sampling)
        for row, i in enumerate(rows):
            outputs[i] = _until_eos(generated[row, width:].tolist(), tokenizer.eos_token_id)
    return outputs


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """The tokens before the first end-of-sequence (after it, generate() only pads)."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
