"""Per-request sampling settings and the choice of each row's next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)  # the answer ends before the first of these
    seed: int | None = None  # the same seed, prompt and adapter give the same tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if not 0 <= self.temperature <= 2:
            raise ConfigError("temperature must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise ConfigError("stop must be up to 4 non-empty strings")


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one row, from its (V,) logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
