"""Rows of one batch on different adapters give what each row gives alone with its adapter."""

import pytest
import torch

import lorakit
from lorakit.core.walk import lora_layers
from lorakit.rows import (
    RowPlan,
    RowSegment,
    row_segments,
    rows_use_adapters,
    rows_use_plan,
)
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama

ROWS = ["a", "a", None, "b", "c", "c"]


def _model(build, targets):
    model = build().eval()
    for seed, (name, r) in enumerate({"a": 2, "b": 4, "c": 8}.items()):  # mixed ranks in one batch
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets), name=name)
        randomize_adapters(model, seed=seed)  # new adapter's B would be 0; earlier ones get new values too
    return model


def _alone(model, ids, name):
    if name is None:
        with lorakit.disable_adapters(model):
            return model(ids).logits
    lorakit.set_adapter(model, name)
    return model(ids).logits


@pytest.mark.parametrize("rows", [ROWS, ["c", "a", "b"]], ids=["uneven-segments", "one-row-each"])
@pytest.mark.parametrize("stacked", [False, True], ids=["per-segment", "stacked"])
@pytest.mark.parametrize(("build", "targets"), [
    (tiny_llama, ["embed_tokens", "q_proj", "v_proj", "down_proj"]),  # embedding adapters route by row too
    (tiny_gpt2, "all-linear"),  # GPT-2's Conv1D
])
def test_each_row_gets_its_own_adapter(build, targets, stacked, rows):
    model = _model(build, targets)
    ids = torch.randint(3, 96, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rows_use_adapters(model, rows, stacked=stacked):
        mixed = model(ids).logits
    with torch.no_grad():
        expected = torch.cat([_alone(model, ids[i:i + 1], name) for i, name in enumerate(rows)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[-1])  # the adapters do differ


def test_a_stacked_plan_takes_over_the_earlier_plans_stacks_only_while_they_still_hold():
    model = _model(tiny_llama, "all-linear")
    layer = next(layer for _, layer in lora_layers(model))
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(0))

    def run(rows, earlier):
        plan = RowPlan(row_segments(rows), stacked=True, earlier=earlier)
        with torch.no_grad(), rows_use_plan(plan):
            mixed = model(ids).logits
        with torch.no_grad():
            expected = torch.cat([_alone(model, ids[i:i + 1], name) for i, name in enumerate(rows)])
        torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
        return plan

    first = run(["a", "b", "c"], None)
    first_a = first.stacks[id(layer)].a
    same = run(["a", "b", "c"], first)
    assert same.stacks[id(layer)].a is first_a  # the same adapters: no copy at all
    subset = run(["a", "a", "c"], same)  # rows regrouped, b gone: a and c copied into the earlier stack's memory
    assert subset.stacks[id(layer)].a.shape[0] == 2
    assert subset.stacks[id(layer)].a.data_ptr() == first_a.data_ptr()
    subset_sources = subset.stacks[id(layer)].sources
    randomize_adapters(model, seed=7)  # written to in place: the earlier copies are stale (run checks the outputs)
    changed = run(["a", "a", "c"], subset)
    assert changed.stacks[id(layer)].sources != subset_sources
    grown = run(["a", "b", "c"], changed)  # three adapters again: the memory has room for them
    assert grown.stacks[id(layer)].a.data_ptr() == first_a.data_ptr()


def test_gradients_reach_every_adapter_through_a_stacked_plan():
    model = _model(tiny_llama, "all-linear")
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(0))
    adapters = [p.requires_grad_() for n, p in model.named_parameters() if "lora_" in n]
    grads = {}
    for stacked in (False, True):
        model.zero_grad(set_to_none=True)
        with rows_use_adapters(model, ["a", "b", "c"], stacked=stacked):
            model(ids).logits.square().mean().backward()
        grads[stacked] = [p.grad.clone() for p in adapters]
    assert all(grad.abs().sum() > 0 for grad in grads[True])  # every A and B of the three adapters
    for stacked_grad, loop_grad in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(stacked_grad, loop_grad, rtol=1e-4, atol=1e-6)
    plan = RowPlan(row_segments(["a", "b", "c"]), stacked=True)
    with rows_use_plan(plan):
        model(ids).logits.sum().backward()
    stacks = [s for s in plan.stacks.values() if s is not None]
    assert stacks and all(s.memory == (None, None) for s in stacks)  # backward's tensors are never written over


def test_one_adapter_for_every_row_is_one_segment():
    assert row_segments(["a"] * 4) == (RowSegment("a", 0, 4),)
    assert row_segments([None, "a", "a"]) == (RowSegment(None, 0, 1), RowSegment("a", 1, 3))


def test_bad_row_plans_are_clear_errors():
    model = _model(tiny_llama, ["q_proj"])
    with pytest.raises(lorakit.ConfigError, match="not next to each other"):
        row_segments(["a", "b", "a"])
    with pytest.raises(lorakit.ConfigError, match="no adapter named 'zzz'"), rows_use_adapters(model, ["a", "zzz"]):
        pass
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(lorakit.MergeError, match="unmerge"), rows_use_adapters(model, ["a", "b"]):
        model(torch.zeros(2, 3, dtype=torch.long))
