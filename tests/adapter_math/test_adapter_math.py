"""lorakit rank, resize and combine: exact against dense float64 maths, and combine equal to PEFT's
add_weighted_adapter on the same adapters."""

import re

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.adapter_math.combine import combine
from lorakit.adapter_math.resize import resize
from lorakit.adapter_math.spectrum import spectra
from lorakit.adapter_math.updates import layer_updates, write_updates
from lorakit.cli import main
from lorakit.core.svd import product_svd
from lorakit.errors import ConfigError
from lorakit.files.peft_format import read_adapter
from tests.conftest import randomize_adapters
from tests.test_peft_parity import PARITY_CASES
from tests.test_peft_parity_variants import DORA_CASES

LLAMA = DORA_CASES[3]


def saved(tmp_path, name, case=LLAMA, seed=0, targets=None, **config):
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 8, "alpha": 16, "target_modules": targets or case.targets,
                                                **config}))
    randomize_adapters(model, seed=seed)
    lorakit.save_adapter(model, tmp_path / name)
    return tmp_path / name


def updates_of(directory):
    return layer_updates(read_adapter(directory), str(directory))


def test_the_product_svd_is_the_svd_of_the_dense_update():
    a, b = torch.randn(6, 40, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    u, s, vh = product_svd(a, b, 0.5)
    dense = 0.5 * b @ a
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:6])
    torch.testing.assert_close(u * s @ vh, dense)


@pytest.mark.parametrize("case", [LLAMA, DORA_CASES[2]], ids=["llama", "conv"])
def test_resize_is_the_best_rank_k_approximation_and_lossless_at_full_rank(case, tmp_path):
    source = saved(tmp_path, "a", case)
    files = read_adapter(source)
    updates = updates_of(source)
    config, resized, report = resize(files.config, updates, rank=3)
    assert config.r == 3 and all(t.new_rank == 3 for t in report)
    for old, new, t in zip(updates, resized, report):
        assert new.lora_A.shape == (3, *old.lora_A.shape[1:]) and new.lora_B.shape[:2] == (old.lora_B.shape[0], 3)
        u, s, vh = torch.linalg.svd(old.delta(), full_matrices=False)
        best = u[:, :3] * s[:3] @ vh[:3]
        torch.testing.assert_close(new.delta(), best, rtol=1e-5, atol=1e-6)
        assert t.relative_error == pytest.approx(float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-4)

    write_updates(tmp_path / "full", *resize(files.config, updates, rank=8)[:2], files.fan_in_fan_out_modules)
    x = case.input()
    original = case.run(lorakit.load_adapter(case.model(), source), x)
    torch.testing.assert_close(case.run(lorakit.load_adapter(case.model(), tmp_path / "full"), x), original,
                               rtol=1e-4, atol=1e-5)


def test_resize_by_energy_keeps_a_rank_per_layer_and_the_file_loads(tmp_path):
    source = saved(tmp_path, "a")
    files = read_adapter(source)
    config, resized, report = resize(files.config, updates_of(source), energy=0.9)
    ranks = [t.new_rank for t in report]
    assert max(ranks) == config.r and all(1 <= k <= 8 for k in ranks)
    assert all(t.relative_error <= (1 - 0.9) ** 0.5 + 1e-9 for t in report)
    write_updates(tmp_path / "b", config, resized, files.fan_in_fan_out_modules)
    for layer in spectra(updates_of(tmp_path / "b")):
        assert layer.r == {t.path: t.new_rank for t in report}[layer.path]
    lorakit.load_adapter(LLAMA.model(), tmp_path / "b")


def test_rank_and_resize_commands(tmp_path, capsys):
    source = saved(tmp_path, "a")
    assert main(["rank", str(source)]) == 0
    out = capsys.readouterr().out
    assert "rank99" in out and "q_proj" in out and (source / "rank_spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["resize", str(source), "--rank", "2", "--output", str(tmp_path / "r2")]) == 0
    assert lorakit.read_adapter_config(tmp_path / "r2").r == 2
    assert main(["resize", str(source), "--rank", "2", "--output", str(tmp_path / "r2")]) == 2  # exists
    assert "exists; pass --overwrite" in capsys.readouterr().err


def _peft_combined(tmp_path, directories, weights, method, case=LLAMA, **kwargs):
    peft_model = PeftModel.from_pretrained(case.model(), directories[0], adapter_name="a0")
    for i, directory in enumerate(directories[1:], start=1):
        peft_model.load_adapter(directory, adapter_name=f"a{i}")
    peft_model.add_weighted_adapter([f"a{i}" for i in range(len(directories))], weights, "mix",
                                    combination_type=method, **kwargs)
    peft_model.set_adapter("mix")
    return peft_model


@pytest.mark.parametrize(("method", "peft_kwargs"), [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 6}),
                                                     ("ties", {"density": 0.5})])
def test_combine_equals_peft_add_weighted_adapter(method, peft_kwargs, tmp_path):
    first = saved(tmp_path, "a", seed=1)
    second = saved(tmp_path, "b", seed=2, alpha=4, targets=["q_proj", "v_proj"])  # other scaling and targets
    weights = [0.7, -0.4]
    files = [read_adapter(first), read_adapter(second)]
    config, combined = combine([f.config for f in files], [updates_of(first), updates_of(second)], weights, method,
                               svd_rank=peft_kwargs.get("svd_rank"), density=peft_kwargs.get("density", 1.0))
    write_updates(tmp_path / "mix", config, combined, None)
    x = LLAMA.input()
    ours = LLAMA.run(lorakit.load_adapter(LLAMA.model(), tmp_path / "mix"), x)
    theirs = LLAMA.run(_peft_combined(tmp_path, [first, second], weights, method, **peft_kwargs), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - LLAMA.run(LLAMA.model(), x)).abs().max() > 1e-3  # the mix changes the model


def test_cat_is_exactly_the_weighted_sum_of_the_updates(tmp_path):
    first, second = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2, r=4, alpha=2)
    config, combined = combine([read_adapter(p).config for p in (first, second)],
                               [updates_of(first), updates_of(second)], [2.0, 0.5], "cat")
    assert config.r == 12
    expected = {u.path: 2.0 * u.delta() for u in updates_of(first)}
    for u in updates_of(second):
        expected[u.path] = expected[u.path] + 0.5 * u.delta()
    for u in combined:
        torch.testing.assert_close(u.delta(), expected[u.path])


def test_dare_prunes_to_the_density_reproducibly_and_combine_refuses_what_it_cannot_mix(tmp_path):
    first, second = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    args = ([read_adapter(p).config for p in (first, second)], [updates_of(first), updates_of(second)], [1.0, 1.0])
    one = combine(*args, "dare_linear", density=0.5, seed=3)[1]
    again = combine(*args, "dare_linear", density=0.5, seed=3)[1]
    assert all(torch.equal(u.lora_A, v.lora_A) for u, v in zip(one, again))
    assert not torch.equal(one[0].lora_A, combine(*args, "dare_linear", density=0.5, seed=4)[1][0].lora_A)
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        combine(args[0], args[1], [1.0], "cat")
    with pytest.raises(ConfigError, match="every adapter at one rank"):
        smaller = saved(tmp_path, "c", r=4)
        combine([args[0][0], read_adapter(smaller).config], [updates_of(first), updates_of(smaller)], [1, 1], "linear")
    dora = saved(tmp_path, "d", use_dora=True)
    with pytest.raises(ConfigError, match="DoRA adapters do not combine"):
        combine([read_adapter(dora).config, args[0][0]], [updates_of(dora), updates_of(first)], [1, 1], "cat")


def test_combine_command_on_embedding_adapters_equals_peft(tmp_path, capsys):
    case = PARITY_CASES[3]  # an nn.Embedding: A (r, vocab), B (dim, r)
    first, second = saved(tmp_path, "a", case, seed=1), saved(tmp_path, "b", case, seed=2)
    assert main(["combine", str(first), str(second), "--weights", "1", "0.5", "--method", "svd",
                 "--output", str(tmp_path / "mix")]) == 0
    assert "combined adapter (svd, r=8" in capsys.readouterr().out
    x = case.input()
    ours = case.run(lorakit.load_adapter(case.model(), tmp_path / "mix"), x)
    theirs = case.run(_peft_combined(tmp_path, [first, second], [1, 0.5], "svd", case=case), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_resize_scores_both_adapters_on_data(tiny_base_dir, tmp_path, capsys):
    from lorakit.models.base import load_base
    from tasks import orders

    orders.write_splits(tmp_path, {"val": 3})
    model, _ = load_base(str(tiny_base_dir))
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    assert main(["resize", str(tmp_path / "a"), "--rank", "1", "--output", str(tmp_path / "r1"), "--data",
                 str(tmp_path / "val.jsonl"), "--base", str(tiny_base_dir)]) == 0
    assert re.search(r"exact match on .*val.jsonl: \d+\.\d% \(r=4\) -> \d+\.\d% \(r=1\)", capsys.readouterr().out)
