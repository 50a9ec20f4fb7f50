"""Text generation with a base model and (optionally) an adapter, for eval, generate and chat.

Batches are left-padded (generation appends on the right) and built from prompts of similar
length; greedy decoding unless a temperature is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lorakit.data.tokenize import padding_id
from lorakit.io.base_model import load_base
from lorakit.io.peft_format import load_adapter, read_adapter_config


def load_for_inference(base: str | None, adapter: str | Path | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode on the best device, with ``adapter`` loaded if given."""
    model, tokenizer = load_base(base, dtype)
    if adapter is not None:
        recorded = read_adapter_config(adapter).base_model_name_or_path
        if recorded and recorded != str(model.name_or_path):
            print(f"lorakit: warning: {adapter} was trained on {recorded}, not {model.name_or_path}", file=sys.stderr)
        load_adapter(model, adapter)
    model.config.use_cache = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class StopUnlessJsonObject:
    """A stopping criterion: a row stops as soon as its first non-blank character is not "{", because
    such an answer can never parse as a JSON object. Scoring against JSON references is unchanged by
    it (the answer was a miss either way); a base model that would ramble for 50 tokens stops after one."""

    LOOK_AHEAD = 4  # tokens decoded to find the first non-blank character

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        heads = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:self.prompt_width + self.LOOK_AHEAD],
                                            skip_special_tokens=True)
        return torch.tensor([bool(h.strip()) and not h.lstrip().startswith("{") for h in heads],
                            dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   temperature: float = 0.0, top_p: float = 1.0, progress: bool = False, streamer=None,
                   json_only: bool = False) -> list[str]:
    """The continuation of each prompt (special tokens removed), in the prompts' order. With
    ``json_only``, a continuation that cannot become a JSON object is cut short (StopUnlessJsonObject)."""
    device = next(model.parameters()).device
    pad_id = padding_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    outputs: list[str] = [""] * len(prompts)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", file=sys.stderr, leave=False)
    for rows in batches:
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        stop = [StopUnlessJsonObject(tokenizer, width)] if json_only else []
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                                   stopping_criteria=stop or None, **sampling)
        for row, i in enumerate(rows):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return outputs
