"""LoRA on nn.Embedding: y = W[ids] + s * A^T[ids] B^T.

A is (r, vocab) and B is (dim, r), PEFT's lora_embedding_A / lora_embedding_B. Initialised the
other way round from linear layers (A zeros, B normal, as loralib), with no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.adapter import LoraAdapter, share_base_parameters
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.linear import WeightMerging


class Embedding(LoraLayer, WeightMerging, nn.Embedding):
    """nn.Embedding with LoRA adapters; a drop-in like ``lorakit.Embedding(vocab, dim, r=8)``."""

    uses_dropout = False
    weight_is_transposed = True  # (vocab, dim), where B @ A is (dim, vocab)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r: int = 8,
        alpha: float = 16,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
    ) -> None:
        nn.Embedding.__init__(
            self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            device=device, dtype=dtype,
        )
        self._setup_with_adapter(r, alpha, 0.0, adapter_name, config)

    @classmethod
    def from_base(cls, base: nn.Embedding) -> Embedding:
        with torch.device("meta"):  # skip allocating and initialising a weight we replace
            layer = cls(**embedding_kwargs(base), r=0)
        return share_base_parameters(base, layer)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, module.num_embeddings), (module.embedding_dim, r)

    def _init_adapter(self, adapter: LoraAdapter, init: str) -> None:
        nn.init.zeros_(adapter.lora_A)
        nn.init.normal_(adapter.lora_B)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self._add_adapters(result, ids)

    def adapter_update(self, ids: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        a = adapter.lora_A.to(self.weight.dtype)  # (r, vocab)
        b = adapter.lora_B.to(self.weight.dtype)  # (dim, r)
        h = F.embedding(ids, a.T, self.padding_idx) * adapter.scaling  # (..., r): rows of A^T
        return F.linear(h, b)  # (..., dim)

    def plain_module(self) -> nn.Embedding:
        with torch.device("meta"):
            plain = nn.Embedding(**embedding_kwargs(self))
        return share_base_parameters(self, plain)


def embedding_kwargs(emb: nn.Embedding) -> dict:
    """The constructor arguments that rebuild ``emb``'s shape and behaviour."""
    return {
        "num_embeddings": emb.num_embeddings,
        "embedding_dim": emb.embedding_dim,
        "padding_idx": emb.padding_idx,
        "max_norm": emb.max_norm,
        "norm_type": emb.norm_type,
        "scale_grad_by_freq": emb.scale_grad_by_freq,
        "sparse": emb.sparse,
    }
