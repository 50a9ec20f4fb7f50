"""Linear weights packed for oneDNN: the same products as F.linear up to the last bits, used only
without gradients, following every write to the weights, and gone after release()."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lorakit
from lorakit.models.packed_weights import (
    PackedLinearWeights,
    packed_linear_weights,
    packing_available,
)
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")


def _lora_llama(dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             use_dora=dora))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def _packed_products(fn) -> tuple[object, int]:
    """fn()'s result and how many products ran on packed weights."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("dora", [False, True])
def test_packed_products_match_f_linear_and_every_linear_uses_them(dora):
    model = _lora_llama(dora)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        expected = model(ids).logits
        packed = PackedLinearWeights(model)
        logits, products = _packed_products(lambda: model(ids).logits)
    linears = _linears(model)  # the LoRA layers, the untargeted Linears and the output head
    assert products == len(linears)
    assert packed.nbytes == sum(m.weight.numel() * 4 for m in linears)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_products_that_take_gradients_compute_with_f_linear_and_train_as_before():
    model = _lora_llama()
    lorakit.mark_only_lora_as_trainable(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    model(ids).logits.square().mean().backward()
    expected = [p.grad.clone() for p in lorakit.lora_parameters(model)]
    model.zero_grad(set_to_none=True)

    PackedLinearWeights(model)
    loss, products = _packed_products(lambda: model(ids).logits.square().mean())
    loss.backward()
    # The A matrices take gradients, so every input past the first LoRA layer does, and so does every product after it.
    assert products < len(_linears(model))
    for got, want in zip((p.grad for p in lorakit.lora_parameters(model)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_write_to_a_weight_is_followed_by_its_packed_copy():
    model = _lora_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    PackedLinearWeights(model)
    with torch.no_grad():
        before = model(ids).logits
        lorakit.merge(model)  # writes B A into the LoRA layers' weights
        merged, products = _packed_products(lambda: model(ids).logits)
        lorakit.unmerge(model)
        model.lm_head.weight.mul_(2)  # and a plain in-place write to the output head
        doubled = model(ids).logits
    assert products == len(_linears(model))
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)  # merged or not: the same model
    torch.testing.assert_close(doubled, 2 * before, rtol=1e-4, atol=1e-5)


def test_layers_put_in_later_are_covered_with_the_same_copies_and_release_restores_f_linear():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    packed = PackedLinearWeights(model)
    nbytes = packed.nbytes
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))  # new modules, same weights
    with torch.no_grad():
        _, before_cover = _packed_products(lambda: model(ids))
        packed.cover()
        _, after_cover = _packed_products(lambda: model(ids))
    assert before_cover == 1  # only the output head was left as it was
    assert after_cover == len(_linears(model))
    assert packed.nbytes == nbytes  # the LoRA layers share the packed copies of their base weights
    packed.release()
    with torch.no_grad():
        _, released = _packed_products(lambda: model(ids))
    assert released == 0 and packed.nbytes == 0
    assert not any("forward" in vars(m) for m in model.modules())


def test_other_dtypes_are_left_to_f_linear():
    model = tiny_llama().to(torch.bfloat16).eval()
    packed = PackedLinearWeights(model)
    with torch.no_grad():
        _, products = _packed_products(lambda: model(torch.tensor([[1, 2, 3]])))
    assert packed.nbytes == 0 and products == 0


def test_copies_that_would_not_fit_in_memory_are_not_made(monkeypatch):
    from lorakit.models import packed_weights

    model = tiny_llama().eval()
    needed = sum(m.weight.numel() * 4 for m in _linears(model))
    monkeypatch.setattr(packed_weights, "available_memory_bytes", lambda: 2 * needed - 1)
    packed = PackedLinearWeights(model)
    with torch.no_grad():
        _, products = _packed_products(lambda: model(torch.tensor([[1, 2, 3]])))
    assert (packed.nbytes, packed.declined_bytes, products) == (0, needed, 0)
    monkeypatch.setattr(packed_weights, "available_memory_bytes", lambda: 2 * needed)
    packed.cover()
    assert packed.nbytes == needed


def test_a_second_packing_leaves_the_first_ones_modules_alone():
    model = tiny_llama().eval()
    ids = torch.tensor([[1, 2, 3]])
    outer = PackedLinearWeights(model)
    with packed_linear_weights(model) as inner:
        assert inner.nbytes == 0  # every Linear is routed already
    with torch.no_grad():
        _, products = _packed_products(lambda: model(ids))
    assert products == len(_linears(model)) and outer.nbytes > 0


def test_under_autocast_products_keep_autocast_s_dtype():
    model = _lora_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
        PackedLinearWeights(model)
        logits, products = _packed_products(lambda: model(ids).logits)
    assert products == 0 and torch.equal(logits, expected)
