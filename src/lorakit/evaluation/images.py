"""Scoring an image classifier: top-1 accuracy, per-class accuracy, the confusion matrix (and its
picture), and the mean cross-entropy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.images import ImageSet, model_input
from lorakit.errors import ConfigError
from lorakit.files.atomic import atomic_path
from lorakit.files.peft_format import load_adapter
from lorakit.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, image_classifier

TASK_FILE = "image_task.json"  # written beside an image adapter: its base, classes and image size
IMAGE_SOURCES = ("fashion-mnist", "digits", "faces")


def is_image_data(spec: str) -> bool:
    """Whether ``spec`` names one of lorakit's image data sets (fashion-mnist/test, ...)."""
    return str(spec).split("/")[0] in IMAGE_SOURCES


def load_image_adapter(adapter: str | Path) -> tuple[nn.Module, dict]:
    """(the adapted classifier in eval mode, its task description) for an image adapter directory."""
    task_path = Path(adapter) / TASK_FILE
    if not task_path.is_file():
        raise ConfigError(f"{adapter}: no {TASK_FILE}, so not an image-classification adapter lorakit trained")
    try:
        task = json.loads(task_path.read_text(encoding="utf-8"))
        base, classes, size = task["base"], task["classes"], int(task["image_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{task_path}: unreadable ({err})") from None
    model = load_adapter(image_classifier(base, len(classes)), adapter)
    return model.eval(), {"base": base, "classes": classes, "image_size": size}


class ImageScore:
    def __init__(self, loss: float, confusion: torch.Tensor, classes: tuple[str, ...]) -> None:
        self.loss, self.confusion, self.classes = loss, confusion, classes  # confusion[true, predicted]

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum() / self.confusion.sum())

    def per_class(self) -> list[float]:
        return (self.confusion.diag() / self.confusion.sum(dim=1).clamp(min=1)).tolist()


@torch.no_grad()
def evaluate_images(model: nn.Module, data: ImageSet, image_size: int, batch_size: int,
                    device: torch.device) -> ImageScore:
    """Mean cross-entropy, and the confusion matrix (rows: true class, columns: predicted), over
    ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    classes = len(data.classes)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    total = 0.0
    for start in range(0, len(data), batch_size):
        images = model_input(data.images[start:start + batch_size], image_size, IMAGENET_MEAN, IMAGENET_STD)
        labels = data.labels[start:start + batch_size]
        logits = model(images.to(device)).float().cpu()
        if logits.shape[-1] != classes:
            raise ConfigError(f"the model answers {logits.shape[-1]} classes, but {data.name} has {classes}")
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        confusion += torch.bincount(labels * classes + logits.argmax(-1), minlength=classes * classes).view(
            classes, classes)
    model.train(was_training)
    return ImageScore(total / len(data), confusion, data.classes)


def plot_confusion(score: ImageScore, png_path: Path, title: str) -> Path | None:
    """The confusion matrix as a picture, each row normalised to the true class's count (None
    without matplotlib, an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rates = (score.confusion / score.confusion.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(score.classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n), dpi=110)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), score.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), score.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: top-1 {100 * score.accuracy:.1f}% (row %)", fontsize=9)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path
