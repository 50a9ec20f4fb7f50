"""Truncated SVD (best rank-r approximation, rank by energy) and `lorakit compress`."""

import json

import pytest
import torch
from torch import nn

from lorakit.cli import main
from lorakit.core.svd import low_rank_factors, rank_for_energy, singular_values
from lorakit.errors import ConfigError
from lorakit.models.base import load_base
from lorakit.models.compress import (
    COMPRESSION_CONFIG,
    factorise_linears,
    load_compressed,
    low_rank_linear,
    quantize_int8,
)
from tasks import orders

IDS = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _weight_with_spectrum(values, out=40, cols=30):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_the_factors_are_the_best_rank_r_approximation():
    values = [8.0, 4.0, 2.0, 1.0, 0.5]
    weight = _weight_with_spectrum(values)
    for rank in range(1, 6):
        up, down = low_rank_factors(weight, rank)
        assert up.shape == (40, rank) and down.shape == (rank, 30)
        error = torch.linalg.matrix_norm(weight - up @ down)
        expected = torch.tensor(values[rank:], dtype=torch.float64).square().sum().sqrt()
        torch.testing.assert_close(error, expected, rtol=1e-9, atol=1e-9)  # Eckart-Young: the dropped values


def test_rank_for_energy_keeps_the_asked_fraction():
    values = singular_values(_weight_with_spectrum([3.0, 2.0, 1.0, 1.0]))  # S^2: 9, 4, 1, 1 of 15
    assert [rank_for_energy(values, e) for e in (0.6, 0.61, 13 / 15, 0.9, 1.0)] == [1, 2, 2, 3, 4]
    with pytest.raises(ConfigError, match="energy"):
        rank_for_energy(values, 0)
    with pytest.raises(ConfigError, match="rank 7"):
        low_rank_factors(torch.randn(6, 5), 7)


def test_a_low_rank_linear_computes_the_factorised_layer():
    torch.manual_seed(0)
    linear = nn.Linear(30, 20)
    pair = low_rank_linear(linear, 20)  # full rank: the same layer
    x = torch.randn(4, 30)
    torch.testing.assert_close(pair(x), linear(x), rtol=1e-5, atol=1e-5)
    assert pair[0].bias is None and torch.equal(pair[1].bias, linear.bias)


def test_layers_stay_dense_where_factors_would_not_be_smaller(tiny_base_dir):
    model, _ = load_base(tiny_base_dir)
    outcomes = factorise_linears(model, ("q_proj", "gate_proj"), rank=8)
    assert {o.path.rsplit(".", 1)[1] for o in outcomes} == {"q_proj", "gate_proj"}
    # q_proj (32, 32): 8 * 64 < 1024, factorised; gate_proj (64, 32) likewise.
    assert all(o.replaced for o in outcomes)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Sequential)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)  # not targeted
    model, _ = load_base(tiny_base_dir)
    outcomes = factorise_linears(model, "all-linear", energy=1.0)
    assert not any(o.replaced for o in outcomes) and len(outcomes) == 14  # full rank saves nothing; head left out
    with pytest.raises(ConfigError, match="match no Linear"):
        factorise_linears(model, ("nothing",), rank=2)


def test_int8_keeps_a_model_close_and_shrinks_it(tiny_base_dir):
    from lorakit.models.compress import serialized_bytes

    model, _ = load_base(tiny_base_dir)
    expected = _logits(model)
    size = serialized_bytes(model)
    model = quantize_int8(model)
    assert (_logits(model) - expected).norm() / expected.norm() < 0.2  # int8 weights and activations: close, not equal
    assert serialized_bytes(model) < size


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compress")
    orders.write_splits(directory, {"test": 3})
    return directory / "test.jsonl"


def test_compress_reports_and_writes_a_model_that_loads_back(tiny_base_dir, split, tmp_path, capsys):
    assert main(["compress", "--base", str(tiny_base_dir), "--rank", "8", "--targets", "gate_proj", "up_proj", "down_proj", "--int8",
                 "--data", str(split), "--output", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 targeted layers factorised (ranks 8..8)" in out  # gate, up and down in 2 layers
    table = [line.split() for line in out.splitlines() if line.startswith(("original ", "compressed "))]
    original, compressed = (row for row in table if row[1] != "model")  # not "compressed model written to"
    assert float(compressed[1]) < float(original[1])  # size MiB
    assert "(exact match on 3 examples)" in out
    description = json.loads((tmp_path / "c" / COMPRESSION_CONFIG).read_text())
    assert description["int8"] and set(description["ranks"].values()) == {8}
    loaded, _ = load_base(tmp_path / "c")

    again, _ = load_base(tiny_base_dir)
    factorise_linears(again, ("gate_proj", "up_proj", "down_proj"), rank=8)
    torch.testing.assert_close(_logits(loaded), _logits(quantize_int8(again)))


def test_compress_mistakes_are_one_line(tiny_base_dir, tmp_path, capsys):
    assert main(["compress", "--base", str(tiny_base_dir), "--rank", "0", "--limit", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --rank must be at least 1")
    assert main(["compress", "--base", str(tiny_base_dir), "--energy", "1.5", "--limit", "0"]) == 2
    assert "energy=1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --rank and --energy is required
        main(["compress", "--base", str(tiny_base_dir)])
    with pytest.raises(ConfigError, match="format"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / COMPRESSION_CONFIG).write_text('{"format": "other"}')
        load_compressed(tmp_path / "bad")
