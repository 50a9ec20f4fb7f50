"""The training loop on a tiny random Llama (with SmolLM2's tokenizer): loss falls, resume is exact,
checkpoints and metrics are written, and previous runs are not clobbered."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.files.decoding import DECODING_FILE, recorded_copy_fields
from lorakit.train.checkpoint import CheckpointError, latest_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.loop import lr_factor, train


def _config(tiny_base_dir, data_dir, output, **changes):
    settings = {"base": str(tiny_base_dir), "train": str(data_dir / "train.jsonl"), "val": str(data_dir / "val.jsonl"),
                "output": str(output), "r": 4, "alpha": 8, "dropout": 0.1, "max_steps": 6, "batch_size": 4,
                "lr": 1e-2, "warmup_steps": 2, "eval_every": 3, "save_every": 0, "progress": False}
    return TrainConfig(**{**settings, **changes})


def _metrics(output):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def test_loss_falls_and_the_run_leaves_adapter_metrics_and_plot(tiny_base_dir, data_dir, tmp_path):
    result = train(_config(tiny_base_dir, data_dir, tmp_path, max_steps=30, dropout=0.0, lr=3e-2))
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < 0.75 * first, result.losses
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = _metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in records if "val_loss" in r] == list(range(3, 31, 3))
    assert all(r["target_tokens"] < r["tokens"] for r in records if "loss" in r)  # prompt tokens carry no loss


def test_copy_fields_train_on_copy_aligned_targets(tiny_base_dir, data_dir, tmp_path):
    """The same run with copy_fields reads the same answers cut at the prompt's token boundaries: more
    target tokens (a value's pieces), the same text (data/copy_aligned.py)."""
    plain = train(_config(tiny_base_dir, data_dir, tmp_path / "plain", max_steps=6, eval_every=0))
    aligned = train(_config(tiny_base_dir, data_dir, tmp_path / "aligned", max_steps=6, eval_every=0,
                            copy_fields=["item", "deliver_to"]))
    assert plain.steps == aligned.steps == 6
    targets = [sum(r["target_tokens"] for r in _metrics(tmp_path / run) if "loss" in r) for run in ("plain", "aligned")]
    assert targets[1] > targets[0]
    # recorded beside the adapter, so that eval and generate copy the same fields
    assert recorded_copy_fields(tmp_path / "aligned") == {"item", "deliver_to"}
    assert not (tmp_path / "plain" / DECODING_FILE).exists()


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_base_dir, data_dir, tmp_path):
    whole = train(_config(tiny_base_dir, data_dir, tmp_path / "whole"))
    stopped = train(_config(tiny_base_dir, data_dir, tmp_path / "split"), stop_after=3)
    assert stopped.steps == 3 and latest_checkpoint(tmp_path / "split").step == 3
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()  # no final adapter before the end
    resumed = train(_config(tiny_base_dir, data_dir, tmp_path / "split"), resume=True)

    assert stopped.losses + resumed.losses == whole.losses  # bit for bit: dropout RNG and AdamW state restored
    assert _metrics(tmp_path / "split") == _metrics(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_keep_only_the_latest_complete_one(tiny_base_dir, data_dir, tmp_path):
    train(_config(tiny_base_dir, data_dir, tmp_path, save_every=2, eval_every=0))
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert entries == ["latest", "step-000006"]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-000006").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "state.json"]


def test_a_previous_run_is_not_clobbered_and_resume_refuses_changed_settings(tiny_base_dir, data_dir, tmp_path):
    train(_config(tiny_base_dir, data_dir, tmp_path, max_steps=2))
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(_config(tiny_base_dir, data_dir, tmp_path, max_steps=2))
    with pytest.raises(ConfigError, match=r"cannot resume with changed settings: lr \(checkpoint 0.01, now 0.02\)"):
        train(_config(tiny_base_dir, data_dir, tmp_path, max_steps=2, lr=2e-2), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(_config(tiny_base_dir, data_dir, tmp_path / "fresh"), resume=True)
    train(_config(tiny_base_dir, data_dir, tmp_path, max_steps=1), overwrite=True)
    assert latest_checkpoint(tmp_path).step == 1


def test_the_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, total=20, warmup=4, floor=0.1) for s in range(20)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_gradient_checkpointing_keeps_the_losses(tiny_base_dir, data_dir, tmp_path):
    plain = train(_config(tiny_base_dir, data_dir, tmp_path / "plain", max_steps=3, dropout=0.0))
    checkpointed = train(_config(tiny_base_dir, data_dir, tmp_path / "gc", max_steps=3, dropout=0.0,
                                 gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_gradient_checkpointing_works_under_bfloat16_products(tiny_base_dir, data_dir, tmp_path):
    # The recomputation in backward must take the forward's attention kernel (PyTorch checks that the
    # recomputed tensors match), so checkpointed runs keep PyTorch's default kernel (train/precision.py).
    plain = train(_config(tiny_base_dir, data_dir, tmp_path / "plain", max_steps=3, dropout=0.0,
                          compute_dtype="bfloat16"))
    checkpointed = train(_config(tiny_base_dir, data_dir, tmp_path / "gc", max_steps=3, dropout=0.0,
                                 compute_dtype="bfloat16", gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=2e-2)


def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tiny_base_dir, data_dir, tmp_path):
    plain = train(_config(tiny_base_dir, data_dir, tmp_path / "plain", max_steps=3, dropout=0.3))
    checkpointed = train(_config(tiny_base_dir, data_dir, tmp_path / "gc", max_steps=3, dropout=0.3,
                                 gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_a_diverging_run_stops_at_the_step_that_went_non_finite_and_keeps_its_checkpoint(tiny_base_dir, data_dir,
                                                                                         tmp_path):
    from lorakit.train.run import TrainingDiverged

    config = _config(tiny_base_dir, data_dir, tmp_path, lr=1e30, warmup_steps=0, save_every=1, eval_every=0)
    with pytest.raises(TrainingDiverged, match=r"step (\d+): the loss is .* checkpoint, step \d+, is as it was") as err:
        train(config)
    step = int(err.value.args[0].split(":")[0].removeprefix("step "))
    saved = latest_checkpoint(tmp_path)
    assert saved.step == step - 1  # the last good step, written before the bad one, untouched
    tensors = load_file(saved.directory / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "adapter_model.safetensors").exists()  # no NaN adapter saved as a success


def test_resume_drops_a_torn_last_line_of_the_metrics_and_says_so(tiny_base_dir, data_dir, tmp_path, capsys):
    whole = train(_config(tiny_base_dir, data_dir, tmp_path / "whole"))
    train(_config(tiny_base_dir, data_dir, tmp_path / "split", save_every=1), stop_after=3)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "loss": 2.71')  # the process was killed mid-write
    resumed = train(_config(tiny_base_dir, data_dir, tmp_path / "split", save_every=1), resume=True)
    assert "dropped its last line" in capsys.readouterr().err
    assert _metrics(tmp_path / "split") == _metrics(tmp_path / "whole")
    assert resumed.losses == whole.losses[3:]


def test_save_adapter_refuses_non_finite_weights(tmp_path):
    import lorakit
    from tests.conftest import tiny_llama

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(lorakit.AdapterFileError, match="NaN or infinite"):
        lorakit.save_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())
