"""Rows of one batch on different adapters give what each row gives alone with its adapter."""

import pytest
import torch

import lorakit
from lorakit.layers.base import RowSegment
from lorakit.mixed_batch import row_segments, rows_use_adapters
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


@pytest.mark.parametrize("stacked", [False, True], ids=["per-segment", "stacked"])
@pytest.mark.parametrize(("build", "targets"), [
    (tiny_llama, ["embed_tokens", "q_proj", "v_proj", "down_proj"]),  # embedding adapters route by row too
    (tiny_gpt2, "all-linear"),  # GPT-2's Conv1D
])
def test_each_row_gets_its_own_adapter(build, targets, stacked):
    model = _model(build, targets)
    ids = torch.randint(3, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rows_use_adapters(model, ROWS, stacked=stacked):
        mixed = model(ids).logits
    with torch.no_grad():
        expected = torch.cat([_alone(model, ids[i:i + 1], name) for i, name in enumerate(ROWS)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[3])  # the adapters do differ


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
