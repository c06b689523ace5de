"""Vision from scratch (OTO's original setting) on real images: scikit-learn's handwritten digits.

1,797 real 8x8 scans upscaled to 32x32; a stratified half held out (so that the small training
set, not the easy data, limits accuracy). Narrow ResNet- and ConvNeXt-style classifiers built from
``transformers`` configs, trained from a random init: narrow enough that removing channels costs
accuracy (a ResNet of widths 4-8-16 scores about 92%, one of 8-16-32 about 97%).
Metric: top-1 accuracy (percent) on the held-out images.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import torch
from torch import nn

from .base import Budget, Task, TorchPruningSpec, epoch_batches, model_device
from .families import authors_oto, vision_torch_pruning

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "vision"))

from digits import NUM_CLASSES, digits_tensors  # noqa: E402

ARCHITECTURES = {
    "resnet": dict(model_type="resnet", embedding_size=12, hidden_sizes=[12, 24, 48], depths=[1, 1, 1],
                   layer_type="basic", downsample_in_first_stage=False),
    "convnext": dict(model_type="convnext", hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_stages=3,
                     patch_size=2, drop_path_rate=0.0),
}


class DigitsTask(Task):
    metric = "accuracy"
    metrics = ("accuracy",)
    def __init__(self, architecture: str = "resnet", image_size: int = 32, budget: Budget | None = None) -> None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}")
        self.architecture = architecture
        self.name = f"digits-{architecture}"
        self.budget = budget or Budget(steps=150, batch_size=64, learning_rate=3e-3, weight_decay=0.05)
        self.discriminative_range = (90.0, 99.0) if architecture == "resnet" else (80.0, 97.0)
        self.train_x, self.train_y, self.val_x, self.val_y = digits_tensors(image_size=image_size,
                                                                            validation_fraction=0.5)
        self.description = (f"{architecture} from scratch on scikit-learn's digits ({len(self.train_x)} train / "
                            f"{len(self.val_x)} held-out real images, {image_size}x{image_size})")

    def build_model(self, seed: int) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        settings = dict(ARCHITECTURES[self.architecture])
        config = AutoConfig.for_model(settings.pop("model_type"), num_labels=NUM_CLASSES, **settings)
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_config(config)

    def train_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return epoch_batches({"pixel_values": self.train_x, "labels": self.train_y}, self.budget.batch_size, seed)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return nn.functional.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            device = model_device(model)
            predictions = torch.cat([model(pixel_values=x.to(device)).logits.argmax(-1).cpu()
                                     for x in self.val_x.split(256)])
        finally:
            model.train(was_training)
        return {"accuracy": 100.0 * float((predictions == self.val_y).float().mean())}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.val_x[:2]}

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.val_x[:32]}

    def torch_pruning_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> TorchPruningSpec:
        return vision_torch_pruning(model, inputs)

    def authors_oto_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        return authors_oto(model, inputs, ("pixel_values",))
