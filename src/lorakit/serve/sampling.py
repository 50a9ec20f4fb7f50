"""Per-request sampling settings and the choice of each row's next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.errors import ConfigError

# Temperatures between 0 and MIN_TEMPERATURE are refused: they sample greedily in all but name
# (send 0 for that) and push the divided logits towards float32's limits.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)  # the answer ends before the first of these
    seed: int | None = None  # the same seed, prompt and adapter give the same tokens
    json_object: bool = False  # decoding constrained to one JSON object (response_format json_object)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise ConfigError("stop must be up to 4 non-empty strings")


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one row, from its (V,) logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    # Shifted so the largest is 0 before dividing: the quotients are <= 0, and a small temperature
    # sends them towards -inf (probability 0), never to +inf.
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
