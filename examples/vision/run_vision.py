#!/usr/bin/env python
"""Image classification trained once with Only-Train-Once: conv channels (ResNet, ConvNeXt) and
attention heads (ViT) are pruned during training and removed afterwards.

Reports accuracy for the dense start, the trained sparse model and the compressed model, with
parameters, FLOPs and CPU latency before and after, and writes the compressed model with its card
(and, with matplotlib, training.png and layers.png embedded in it), and the compressed model's
class for every validation image in predictions.json.

Offline default, OTO's original setting: a small ResNet trained from scratch while HESSO removes
half of its conv channels, on the real handwritten digits shipped by scikit-learn (upscaled):

    python examples/vision/run_vision.py

    # a Hub dataset (needs network) and a pretrained model
    python examples/vision/run_vision.py --dataset_name cifar10 --model_name_or_path microsoft/resnet-18 \\
        --ignore_mismatched_sizes --output_dir out/cifar-resnet
    # a local image folder (one sub-folder per class, e.g. train/cat/1.png) and a model built from a config
    python examples/vision/run_vision.py --train_dir data/train --validation_dir data/val --model_type convnext
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

# OpenMP threads that spin while waiting burn the CPU other processes need: on a shared or busy
# machine this made the same run 5-10x slower. Sleeping waiters cost little on a quiet machine.
# Set before torch loads; an OMP_WAIT_POLICY from the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    set_seed,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import digits_dataset  # noqa: E402

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402

logger = logging.getLogger("run_vision")
DEFAULT_MODEL_TYPE = "resnet"
DIGITS = "sklearn-digits"  # the data set's name in results and the model card

# Small configurations for --model_type, built from scratch (no download).
MODEL_TYPES = {
    "resnet": dict(model_type="resnet", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                   layer_type="basic"),
    "convnext": dict(model_type="convnext", hidden_sizes=[32, 64, 128], depths=[1, 1, 2], num_stages=3,
                     patch_size=2),
    "vit": dict(model_type="vit", hidden_size=96, num_hidden_layers=4, num_attention_heads=6,
                intermediate_size=192, patch_size=4),
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A Hub model id or local folder."})
    model_type: str | None = field(
        default=None, metadata={"help": f"Build a small model from scratch instead: one of {sorted(MODEL_TYPES)} "
                                        f"(default without --model_name_or_path: {DEFAULT_MODEL_TYPE})."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a pretrained classifier head with another number of labels to be "
                                         "replaced by a new one (only the head)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset such as 'cifar10' (default without --train_dir: scikit-learn's "
                                        "handwritten digits, offline)."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (class sub-folders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: label or labels)."})
    image_size: int = field(default=32, metadata={"help": "Side of the square input images."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})


@dataclass
class VisionTrainingArguments(OTOTrainingArguments):
    """OTOTrainingArguments with defaults that train the digits ResNet in under a minute of CPU."""

    output_dir: str | None = field(default="out/vision", metadata={"help": "Where results go."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=8.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device (training)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size per device (evaluation)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for transforms."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps (the points of training.png)."})


def load_data(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name)
        split = "validation" if "validation" in raw else "test"
        if "train" not in raw or split not in raw:
            raise ValueError(f"dataset {data_args.dataset_name} needs a train and a validation/test split, has {list(raw)}")
        train, dev = raw["train"], raw[split]
    elif data_args.train_dir and data_args.validation_dir:
        for path in (data_args.train_dir, data_args.validation_dir):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"no image folder at {path!r}")
        train = datasets.load_dataset("imagefolder", data_dir=data_args.train_dir, split="train")
        dev = datasets.load_dataset("imagefolder", data_dir=data_args.validation_dir, split="train")
    elif data_args.train_dir or data_args.validation_dir:
        raise ValueError("pass both --train_dir and --validation_dir")
    else:
        logger.info("no --dataset_name or --train_dir: using scikit-learn's handwritten digits, upscaled to %dx%d",
                    data_args.image_size, data_args.image_size)
        raw = digits_dataset(image_size=data_args.image_size)
        train, dev = raw["train"], raw["validation"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        dev = dev.select(range(min(len(dev), data_args.max_eval_samples)))
    return train, dev


def _column(dataset: datasets.Dataset, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    options = (given,) if given else candidates
    for name in options:
        if name in dataset.column_names:
            return name
    raise ValueError(f"the dataset has no {what} column {list(options)} (it has {dataset.column_names}); "
                     f"pass --{what}_column_name")


def make_transform(image_column: str, label_column: str, size: int, processor=None):
    """PIL images to normalised CHW float tensors; the model's own processor when it has one."""
    def transform(batch):
        images = [img.convert("RGB") for img in batch[image_column]]
        if processor is not None:
            pixels = processor(images, return_tensors="pt")["pixel_values"]
        else:
            arrays = [np.asarray(img.resize((size, size)), dtype=np.float32) / 255.0 for img in images]
            pixels = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.5) / 0.5
        return {"pixel_values": pixels, "labels": torch.tensor(batch[label_column])}
    return transform


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([e["labels"] for e in examples])}


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


@torch.no_grad()
def predict(model: torch.nn.Module, loader) -> list[int]:
    """The model's class for each image of ``loader``, in order (written to predictions.json)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = [model(pixel_values=batch["pixel_values"].to(device)).logits.argmax(-1) for batch in loader]
    model.train(was_training)
    return torch.cat(labels).tolist()


def build_model(model_args: ModelArguments, num_labels: int, id2label: dict[int, str], image_size: int):
    if model_args.model_type or not model_args.model_name_or_path:
        model_args.model_type = model_args.model_type or DEFAULT_MODEL_TYPE
        if model_args.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown --model_type {model_args.model_type!r}; choose from {sorted(MODEL_TYPES)}")
        settings = dict(MODEL_TYPES[model_args.model_type])
        kind = settings.pop("model_type")
        if kind == "vit":
            settings["image_size"] = image_size
        config = AutoConfig.for_model(kind, num_labels=num_labels, id2label=id2label,
                                      label2id={v: k for k, v in id2label.items()}, **settings)
        return AutoModelForImageClassification.from_config(config), None
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=num_labels, id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    try:
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError):
        processor = None
    return model, processor


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, VisionTrainingArguments),
                              description=__doc__.split("\n\n")[0])
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    train, dev = load_data(data_args)
    image_column = _column(train, data_args.image_column_name, ("image", "img"), "image")
    label_column = _column(train, data_args.label_column_name, ("label", "labels"), "label")
    feature = train.features[label_column]
    names = feature.names if hasattr(feature, "names") else [str(i) for i in sorted(set(train[label_column]))]
    id2label = dict(enumerate(names))
    model, processor = build_model(model_args, len(names), id2label, data_args.image_size)
    transform = make_transform(image_column, label_column, data_args.image_size, processor)
    train.set_transform(transform)
    dev.set_transform(transform)
    example = collate([train[0], train[1 % len(train)]])

    trainer = OTOTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                         data_collator=collate, compute_metrics=accuracy, processing_class=processor,
                         example_inputs={"pixel_values": example["pixel_values"]})
    dense = trainer.evaluate(metric_key_prefix="dense")
    trainer.train()
    report = trainer.oto_report
    report.metrics = {"dense start": {k.removeprefix("dense_"): v for k, v in dense.items()},
                      **{s: {k.removeprefix("eval_"): v for k, v in m.items()} for s, m in report.metrics.items()}}
    report.datasets = [data_args.dataset_name or ("imagefolder" if data_args.train_dir else DIGITS)]
    report.base_model = model_args.model_name_or_path
    folder = trainer.save_compressed()
    predicted = predict(trainer.compressed_model, trainer.get_eval_dataloader(dev))
    results = {"metrics": report.metrics, "params": [report.params_before, report.params_after],
               "flops": [report.flops_before, report.flops_after],
               "latency_s": [report.latency_before_s, report.latency_after_s]}
    if trainer.is_world_process_zero():
        rows = [("parameters", f"{report.params_before / 1e6:.3f}M", f"{report.params_after / 1e6:.3f}M"),
                ("FLOPs (2 images)", f"{report.flops_before / 1e6:.1f}M", f"{report.flops_after / 1e6:.1f}M")]
        if report.latency_before_s:
            rows.append(("CPU latency (2 images)", f"{report.latency_before_s * 1e3:.1f} ms",
                         f"{report.latency_after_s * 1e3:.1f} ms"))
        rows.append(("accuracy (dense start)", f"{report.metrics['dense start']['accuracy']:.4f}", ""))
        if "sparse" in report.metrics:
            rows.append(("accuracy (trained)", f"{report.metrics['sparse']['accuracy']:.4f}",
                         f"{report.metrics['compressed']['accuracy']:.4f}"))
        width = max(len(r[0]) for r in rows)
        table = "\n".join([f"{'':<{width}}  {'before':>10}  {'after':>10}", "-" * (width + 24)]
                          + [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows])
        results["table"] = table
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(training_args.output_dir, "predictions.json"), "w") as f:
            json.dump([id2label[i] for i in predicted], f)
        print(table)
        print(f"\ncompressed model and card: {folder}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, without a traceback
        sys.exit(f"{os.path.basename(__file__)}: error: {err}")
