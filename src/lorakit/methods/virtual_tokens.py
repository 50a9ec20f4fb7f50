"""Prompt tuning and prefix tuning: trainable positions every input is read after.

Both come down to a key/value cache the model starts from. Prompt tuning (Lester et al. 2021) learns
the embeddings of ``n`` virtual tokens; running them through the frozen model gives every layer's keys
and values for them. Prefix tuning (Li & Liang 2021) learns those keys and values for every layer
directly. Either way the real tokens then attend to ``n`` extra positions first, exactly as if the
virtual tokens stood before them (PEFT concatenates them to the input; the attention each real token
computes is the same, since the virtual tokens come first and attend only to each other).

So both hook the backbone (a transformers decoder, ``model.base_model``) with one pre-forward hook:
when a forward starts without a cache, the hook builds the virtual tokens' cache for the batch; in
every forward it puts ``n`` ones before the attention mask and moves explicit positions on by
``n`` (the virtual tokens hold positions 0..n-1). Training, teacher-forced scoring, transformers'
``generate`` and lorakit's shared-prefix forward all go through it unchanged.

Files: PEFT's format (``peft_type`` PROMPT_TUNING or PREFIX_TUNING; one tensor ``prompt_embeddings``:
(n, hidden) embeddings, or (n, layers * 2 * kv_dim) keys and values, per token: layer 0's key, its
value, layer 1's key, ..., each laid out as (kv heads, head dim)).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.files.peft_format import read_adapter_files, write_adapter_files
from lorakit.methods.method import OFF, Method, MethodSettings, is_off

KEY = "prompt_embeddings"
ENCODER, ENCODER_INPUT = "prefix_encoder", "prefix_encoder.input"  # slots of a reparameterised prefix
MODULE = "lorakit_virtual_tokens"  # where the trainable tensor lives in the model


class VirtualTokens(nn.Module):
    """The trainable virtual tokens of one model and the hook that puts them before every input."""

    def __init__(self, kind: str, value: torch.Tensor, layers: int, kv_heads: int, head_dim: int,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = kind  # "prompt" or "prefix"
        # prompt: (n, hidden); prefix: (n, layers * 2 * kv_heads * head_dim), or with an encoder (n, kv_dim),
        # which the encoder maps to the prefix
        self.value = nn.Parameter(value)
        self.encoder = encoder
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self._running_prompt = False
        setattr(self, OFF, False)

    @property
    def count(self) -> int:
        return self.value.shape[0]

    def tokens(self) -> torch.Tensor:
        """The prompt's embeddings, or the prefix's keys and values (through the encoder, if any)."""
        return self.value if self.encoder is None else self.encoder(self.value)

    def before_forward(self, backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._running_prompt or is_off(self):  # the prompt's own pass through the backbone; switched off
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        rows = (tokens if tokens is not None else kwargs["inputs_embeds"]).shape[0]
        cache = kwargs.get("cache")
        if cache is None or cache.get_seq_length() == 0:
            kwargs["cache"] = self.cache_for(backbone, rows, cache)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("prompt and prefix tuning take a 2-D attention mask (batch, length)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.count), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.count
        return args, kwargs

    def cache_for(self, backbone: nn.Module, rows: int, cache=None):
        """A key/value cache holding the virtual tokens for ``rows`` rows (``cache``, when given empty)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=backbone.config) if cache is None else cache
        dtype = backbone.get_input_embeddings().weight.dtype
        if self.kind == "prompt":
            self._running_prompt = True
            try:
                backbone(inputs_embeds=self.tokens().to(dtype).unsqueeze(0), cache=cache, use_cache=True)
            finally:
                self._running_prompt = False
            if rows > 1:
                cache.batch_repeat_interleave(rows)
            return cache
        # (n, 2L * kv_heads * hd) -> (2L, kv_heads, n, hd): layer l's keys at 2l, its values at 2l + 1
        kv = self.tokens().to(dtype).view(self.count, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        for layer in range(self.layers):
            keys, values = (kv[2 * layer + i].unsqueeze(0).expand(rows, -1, -1, -1) for i in (0, 1))
            cache.update(keys, values, layer)
        return cache


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, hidden, kv heads, head dim) of a transformers decoder."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, head_dim


def virtual_tokens(model: nn.Module) -> VirtualTokens | None:
    return getattr(model, MODULE, None)


class _VirtualTokenMethod(Method):
    kind: str
    peft_type: str
    mergeable = False  # the virtual positions are attended to; nothing folds them into a weight
    servable = False

    def attach(self, model: nn.Module, settings: MethodSettings) -> nn.Module:
        if settings.num_virtual_tokens < 1:
            raise ConfigError("num_virtual_tokens must be at least 1")
        return self._attach(model, self.initial_value(model, settings), self.encoder(model, settings))

    def encoder(self, model: nn.Module, settings: MethodSettings) -> nn.Module | None:
        return None

    def initial_value(self, model: nn.Module, settings: MethodSettings) -> torch.Tensor:
        raise NotImplementedError

    def _attach(self, model: nn.Module, value: torch.Tensor, encoder: nn.Module | None = None) -> nn.Module:
        backbone = getattr(model, "base_model", None)
        if backbone is None or backbone is model or not hasattr(model, "config"):
            raise ConfigError(f"{self.name} tuning needs a transformers causal LM (a model with a base_model)")
        if virtual_tokens(model) is not None:
            raise ConfigError("this model already has virtual tokens")
        for p in model.parameters():
            p.requires_grad_(False)
        layers, _, kv_heads, head_dim = _shape(model)
        tokens = VirtualTokens(self.kind, value.float(), layers, kv_heads, head_dim, encoder)
        model.add_module(MODULE, tokens)
        backbone.register_forward_pre_hook(tokens.before_forward, with_kwargs=True)
        return model

    def expected_shape(self, model: nn.Module, count: int) -> tuple[int, int]:
        raise NotImplementedError

    def slots(self, model: nn.Module) -> dict[str, nn.Parameter]:
        tokens = virtual_tokens(model)
        if tokens.encoder is None:
            return {KEY: tokens.value}
        return {ENCODER_INPUT: tokens.value} | {f"{ENCODER}.{name}": p for name, p in tokens.encoder.named_parameters()}

    def saves_slots(self, model: nn.Module) -> bool:
        return virtual_tokens(model).encoder is None  # with an encoder the file holds its output

    @torch.no_grad()
    def save(self, model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor] | None = None,
             tokenizer=None) -> Path:
        tokens = virtual_tokens(model)
        tensors = tensors if tensors is not None else {key: p.detach() for key, p in self.slots(model).items()}
        if tokens.encoder is None:
            value = tensors[KEY]
        else:  # what the encoder makes of the given tensors (a checkpoint's copies, or the model's own)
            weights = {key.removeprefix(ENCODER + "."): t for key, t in tensors.items() if key != ENCODER_INPUT}
            value = torch.func.functional_call(tokens.encoder, weights, (tensors[ENCODER_INPUT],))
        layers, hidden, kv_heads, head_dim = _shape(model)
        config = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                  "base_model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
                  "num_virtual_tokens": value.shape[0], "num_transformer_submodules": 1, "num_layers": layers,
                  **self.file_fields(hidden, kv_heads, head_dim, model.config.num_attention_heads),
                  **({"prefix_projection": True, "encoder_hidden_size": tokens.encoder[0].out_features}
                     if tokens.encoder is not None else {})}
        return write_adapter_files(directory, config, {KEY: value})

    def file_fields(self, hidden: int, kv_heads: int, head_dim: int, heads: int) -> dict:
        raise NotImplementedError

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        data, tensors, _ = read_adapter_files(directory)
        if set(tensors) != {KEY}:
            raise AdapterFileError(f"{directory}: a {self.peft_type} file holds one tensor, {KEY}; this one holds "
                                   f"{sorted(tensors)[:3]}")
        if data.get("num_transformer_submodules", 1) != 1:
            raise AdapterFileError(f"{directory}: num_transformer_submodules must be 1 (a decoder-only model)")
        # With prefix_projection the file still holds the prefix (the encoder's output, as PEFT saves it too):
        # the encoder only reparameterises training.
        value = tensors[KEY]
        want = self.expected_shape(model, value.shape[0])
        if tuple(value.shape) != want or value.shape[0] != data.get("num_virtual_tokens", value.shape[0]):
            raise AdapterFileError(f"{directory}: {KEY} has shape {tuple(value.shape)}, this model needs {want} for "
                                   f"{data.get('num_virtual_tokens')} virtual tokens; was it made for another base?")
        return self._attach(model, value)


class PromptTuning(_VirtualTokenMethod):
    name = kind = "prompt"
    peft_type = "PROMPT_TUNING"
    default_lr = 3e-2  # soft prompts need a far larger step than weights (PEFT's examples: 3e-2)

    def initial_value(self, model: nn.Module, settings: MethodSettings) -> torch.Tensor:
        """The embeddings of ``n`` real tokens drawn from the vocabulary (PEFT's SAMPLE_VOCAB)."""
        embeddings = model.get_input_embeddings().weight
        ids = torch.randint(0, embeddings.shape[0], (settings.num_virtual_tokens,),
                            generator=torch.Generator().manual_seed(settings.seed))
        return embeddings.detach()[ids.to(embeddings.device)].clone()

    def expected_shape(self, model: nn.Module, count: int) -> tuple[int, int]:
        return count, _shape(model)[1]

    def file_fields(self, hidden: int, kv_heads: int, head_dim: int, heads: int) -> dict:
        return {"token_dim": hidden, "num_attention_heads": heads, "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


class PrefixTuning(_VirtualTokenMethod):
    name = kind = "prefix"
    peft_type = "PREFIX_TUNING"
    default_lr = 1e-2

    @torch.no_grad()
    def initial_value(self, model: nn.Module, settings: MethodSettings) -> torch.Tensor:
        """With an encoder: its input, drawn from N(0, 1) as PEFT's embedding is. Without: the keys and
        values the model itself computes for ``n`` real tokens drawn from the
        vocabulary: a prefix of the scale attention expects (Li & Liang found initialising from real
        words' activations far more stable than at random, which is PEFT's default)."""
        from transformers import DynamicCache

        if settings.prefix_projection:
            _, _, kv_heads, head_dim = _shape(model)
            return torch.randn(settings.num_virtual_tokens, kv_heads * head_dim,
                               generator=torch.Generator().manual_seed(settings.seed))
        embeddings = model.get_input_embeddings().weight
        ids = torch.randint(0, embeddings.shape[0], (1, settings.num_virtual_tokens),
                            generator=torch.Generator().manual_seed(settings.seed)).to(embeddings.device)
        cache = model.base_model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True).cache
        per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, kv_heads, n, hd)
        kv = torch.cat(per_layer)  # (2L, kv_heads, n, hd)
        return kv.permute(2, 0, 1, 3).reshape(settings.num_virtual_tokens, -1).float()

    def expected_shape(self, model: nn.Module, count: int) -> tuple[int, int]:
        layers, _, kv_heads, head_dim = _shape(model)
        return count, layers * 2 * kv_heads * head_dim

    def encoder(self, model: nn.Module, settings: MethodSettings) -> nn.Module | None:
        """PEFT's reparameterisation (``prefix_projection``): an MLP from a (n, kv_dim) embedding to the
        prefix, which Li & Liang found steadier to train than the prefix itself."""
        if not settings.prefix_projection:
            return None
        layers, _, kv_heads, head_dim = _shape(model)
        kv_dim = kv_heads * head_dim
        with torch.random.fork_rng(devices=[]):  # its own draws, leaving the run's random state as it was
            torch.manual_seed(settings.seed)
            return nn.Sequential(nn.Linear(kv_dim, settings.prefix_projection), nn.Tanh(),
                                 nn.Linear(settings.prefix_projection, layers * 2 * kv_dim)).to(model.device)

    def file_fields(self, hidden: int, kv_heads: int, head_dim: int, heads: int) -> dict:
        # PEFT describes a grouped-query model's prefix by its key/value heads.
        return {"token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads, "encoder_hidden_size": hidden,
                "prefix_projection": False}
