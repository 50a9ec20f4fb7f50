"""Keyed dropout: a row's mask depends on its key, its layer and each element's place in the row,
not on the batch around it or on who draws it."""

import torch

from lorakit.core.layers.dropout import (
    RowKeyedDropout,
    assign_layer_keys,
    row_key,
    set_row_keys,
)


def _dropout(p=0.25, layer_key=7):
    module = RowKeyedDropout(p).train()
    module.layer_key = layer_key
    return module


def test_a_rows_mask_is_the_same_in_any_batch_and_at_any_padded_length():
    x = torch.ones(4, 10, 16)
    keys = torch.tensor([row_key(0, 3, i) for i in range(4)])
    module = _dropout()
    module.row_keys = keys
    whole = module(x)
    module.row_keys = keys[[2, 0]]  # two of the rows, in another order, in a batch of their own
    part = module(x[:2])
    assert torch.equal(part[0], whole[2]) and torch.equal(part[1], whole[0])
    module.row_keys = keys[:1]
    longer = module(torch.ones(1, 13, 16))  # padded to 13 positions instead of 10
    assert torch.equal(longer[0, :10], whole[0])


def test_masks_differ_between_rows_layers_and_steps_and_keep_the_expected_share():
    x = torch.ones(2, 64, 64)
    first, second = _dropout(layer_key=1), _dropout(layer_key=2)
    first.row_keys = second.row_keys = torch.tensor([row_key(0, 0, 0), row_key(0, 0, 1)])
    a, b = first(x), second(x)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b)
    first.row_keys = torch.tensor([row_key(0, 1, 0), row_key(0, 1, 1)])  # the next micro-batch
    assert not torch.equal(first(x), a)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02 and torch.all((a == 0) | (a == 1 / 0.75))


def test_without_keys_or_in_eval_it_is_ordinary_dropout():
    module = _dropout(p=0.5)
    x = torch.ones(8, 32)
    assert torch.equal(module.eval()(x), x)
    torch.manual_seed(0)
    ours = module.train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.5, training=True))


def test_layer_keys_come_from_module_names():
    import lorakit
    from tests.conftest import tiny_llama

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.1))
    modules = assign_layer_keys(model)
    assert len(modules) == 4 and len({m.layer_key for m in modules}) == 4
    again = assign_layer_keys(model)
    assert [m.layer_key for m in again] == [m.layer_key for m in modules]
    set_row_keys(modules, torch.tensor([1, 2]))
    assert all(torch.equal(m.row_keys, torch.tensor([1, 2])) for m in modules)
