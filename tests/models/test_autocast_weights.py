"""Frozen Linear weights held in autocast's dtype: the same products bit for bit, and the float32
originals back afterwards."""

import torch
from torch import nn

import lorakit
from lorakit.core.layers.linear import linear_adapter_update
from lorakit.models.autocast_weights import active_autocast_dtype, frozen_weights_in
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


def _lora_llama(tied: bool = False, dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             use_dora=dora))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)  # B = 0 would leave A's gradient zero and prove nothing
    lorakit.mark_only_lora_as_trainable(model)
    return model


def _loss_and_gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_held_weights_give_the_same_loss_and_gradients_bit_for_bit():
    model = _lora_llama(tied=True)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_gradients(model, ids)
    with frozen_weights_in(model, torch.bfloat16) as held:
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        held_loss, held_grads = _loss_and_gradients(model, ids)
    assert held > 0
    assert torch.equal(held_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(held_grads, grads, strict=True))


def test_originals_come_back_and_what_must_stay_float32_stays():
    model = _lora_llama(tied=True)
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    with frozen_weights_in(model, torch.bfloat16) as held:
        dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # the lookup is no autocast op
    assert dtypes["lm_head.weight"] == torch.bfloat16  # the tied head's own copy
    assert dtypes["model.layers.0.self_attn.q_proj.lora.default.lora_A"] == torch.float32  # trains
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16  # LoRA layer's frozen base
    assert dtypes["model.layers.0.self_attn.k_proj.weight"] == torch.bfloat16  # a plain frozen Linear
    assert dtypes["model.layers.0.input_layernorm.weight"] == torch.float32  # no autocast op uses it
    casts = [name for name, dtype in dtypes.items() if dtype == torch.bfloat16]
    assert held == 2 * sum(model.get_parameter(name).numel() for name in casts)
    for name, param in model.named_parameters():
        kept, value = before[name]
        assert param is kept and param.dtype == torch.float32 and torch.equal(param, value)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


def test_dora_layers_and_float32_compute_are_left_alone():
    model = _lora_llama(dora=True)
    with frozen_weights_in(model, torch.bfloat16):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # DoRA takes W's norm
        assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    with frozen_weights_in(model, torch.float32) as held, frozen_weights_in(model, None) as none:
        assert held == none == 0


def test_the_autocast_dtype_is_read_from_the_context():
    assert active_autocast_dtype(CPU) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert active_autocast_dtype(CPU) == torch.bfloat16


def test_under_autocast_a_bfloat16_adapter_input_gives_what_its_float32_widening_gives():
    model = _lora_llama()
    adapter = model.model.layers[0].mlp.down_proj.lora["default"]
    x = torch.randn(3, 48).bfloat16().requires_grad_()
    wide = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_wide = linear_adapter_update(x, adapter), linear_adapter_update(wide, adapter)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_wide.bfloat16())
    y.float().sum().backward()
    y_wide.float().sum().backward()
    assert torch.equal(x.grad.float(), wide.grad)
