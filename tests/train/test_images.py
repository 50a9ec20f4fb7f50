"""Image classification with `lorakit train`: MobileNetV2's ImageNet weights frozen (batch norms
included), LoRA on its convolutions and a new head, on small real image sets (scikit-learn's
digits, scikit-image's faces); resume is exact; eval scores and draws the confusion matrix;
several adapters share one backbone."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.data.images import ImageDataError, image_set, read_idx
from lorakit.evaluation.images import evaluate_images, load_image_adapter
from lorakit.models.mobilenet_v2 import image_classifier
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train


def _config(output, **changes) -> TrainConfig:
    settings = {"task": "image-classification", "base": "mobilenet_v2", "train": "digits/train", "val": "digits/test",
                "output": str(output), "image_size": 64, "r": 4, "alpha": 8, "target_modules": ["all-conv"],
                "max_steps": 6, "batch_size": 16, "lr": 2e-3, "warmup_steps": 1, "eval_every": 3, "save_every": 0,
                "progress": False}
    return TrainConfig(**{**settings, **changes})


def _metrics(output):
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_run_adapts_every_convolution_and_the_head_and_leaves_the_backbone_as_it_was(tmp_path):
    result = train(_config(tmp_path, max_steps=12))
    assert sum(result.losses[-3:]) / 3 < result.losses[0]
    for name in ("adapter_model.safetensors", "adapter_config.json", "image_task.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(k.endswith("lora_A.weight") for k in keys) == 52  # all 52 convolutions, 17 depthwise among them
    assert {"base_model.model.classifier.1.weight", "base_model.model.classifier.1.bias"} <= keys  # the new head
    records = _metrics(tmp_path)
    assert [r["step"] for r in records if "val_accuracy" in r] == [3, 6, 9, 12]
    model, task = load_image_adapter(tmp_path)
    assert task["classes"] == list("0123456789") and task["image_size"] == 64
    fresh = image_classifier("mobilenet_v2", 10)
    for name, buffer in model.named_buffers():  # batch-norm statistics never moved
        if "running" in name:
            assert torch.equal(buffer, fresh.get_buffer(name)), name


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    whole = train(_config(tmp_path / "whole", dropout=0.1))
    stopped = train(_config(tmp_path / "split", dropout=0.1), stop_after=3)
    assert latest_checkpoint(tmp_path / "split").step == 3
    resumed = train(_config(tmp_path / "split", dropout=0.1), resume=True)
    assert stopped.losses + resumed.losses == whole.losses  # shuffling, augmentation and head dropout restored
    assert _metrics(tmp_path / "split") == _metrics(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_prints_accuracy_per_class_and_draws_the_confusion_matrix(tmp_path, capsys):
    train(_config(tmp_path))
    model, _ = load_image_adapter(tmp_path)
    expected = evaluate_images(model, image_set("digits/test"), 64, 64, torch.device("cpu"))
    assert main(["eval", "--adapter", str(tmp_path), "--data", "digits/test"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 accuracy  {100 * expected.accuracy:.2f}%" in out and out.count("  of ") == 10
    assert (tmp_path / "confusion-digits-test.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--adapter", str(tmp_path), "--data", "faces/test"]) == 2  # other classes
    assert "has classes" in capsys.readouterr().err


def test_two_adapters_share_one_backbone_and_each_gives_its_own_answers(tmp_path):
    train(_config(tmp_path / "first", seed=0))
    train(_config(tmp_path / "second", seed=1, lr=4e-3))
    data = image_set("digits/test")
    alone = {name: evaluate_images(load_image_adapter(tmp_path / name)[0], data, 64, 64, torch.device("cpu"))
             for name in ("first", "second")}
    shared = image_classifier("mobilenet_v2", 10)
    for name in ("first", "second"):
        lorakit.load_adapter(shared, tmp_path / name, name=name)
    shared.eval()
    for name in ("first", "second"):
        lorakit.set_adapter(shared, name)
        together = evaluate_images(shared, data, 64, 64, torch.device("cpu"))
        assert torch.equal(together.confusion, alone[name].confusion), name
    assert not torch.equal(alone["first"].confusion, alone["second"].confusion)


def test_missing_or_damaged_image_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ImageDataError, match="apt-get install dataset-fashion-mnist"):
        image_set("fashion-mnist/test")
    with pytest.raises(ImageDataError, match="unknown image data"):
        image_set("cifar/test")
    truncated = tmp_path / "t10k-images-idx3-ubyte"
    truncated.write_bytes(b"\0\0\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ImageDataError, match="truncated"):
        read_idx(truncated)


def test_image_classification_refuses_several_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(lorakit.ConfigError, match="one process"):
        train(_config(tmp_path))
