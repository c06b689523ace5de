"""Real images that install offline: the UCI handwritten digits shipped by scikit-learn.

1,797 grey 8x8 scans of digits written by 43 people (values 0-16), 10 classes. Small, but real;
upscaled, they train conv nets and ViTs from scratch in seconds on a CPU. The split is stratified
and deterministic (the same images in validation on every machine for a given seed).

    from digits import digits_tensors, digits_dataset
    train_x, train_y, val_x, val_y = digits_tensors(image_size=32)    # normalised float tensors
    splits = digits_dataset()            # datasets.DatasetDict of PIL images, for image pipelines
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
LABELS = [str(i) for i in range(NUM_CLASSES)]


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, validation_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class goes to validation. Sorted indices."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        cut = int(round(validation_fraction * len(members)))
        val.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def upscale(images: np.ndarray, image_size: int, channels: int = 3) -> torch.Tensor:
    """``[N, 8, 8]`` in [0, 1] to ``[N, channels, S, S]`` normalised to [-1, 1] (bilinear)."""
    x = torch.from_numpy(images).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, channels, -1, -1).contiguous()


def digits_tensors(image_size: int = 32, validation_fraction: float = 0.25, seed: int = 0,
                   channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_pixels, train_labels, val_pixels, val_labels)``; pixels ``[N, channels, S, S]``.

    Example:
        >>> train_x, train_y, val_x, val_y = digits_tensors(image_size=16)
        >>> tuple(train_x.shape[1:]), len(train_x) + len(val_x)
        ((3, 16, 16), 1797)
    """
    images, labels = _load()
    train, val = split_indices(labels, validation_fraction, seed)
    return (upscale(images[train], image_size, channels), torch.from_numpy(labels[train]),
            upscale(images[val], image_size, channels), torch.from_numpy(labels[val]))


def digits_dataset(validation_fraction: float = 0.25, seed: int = 0, image_size: int = 32):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of RGB PIL images
    (``image``) and class labels (``label``): the layout of Hub image-classification data sets."""
    import datasets
    from PIL import Image

    images, labels = _load()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    splits = {}
    for name, index in zip(("train", "validation"), split_indices(labels, validation_fraction, seed)):
        pil = [Image.fromarray((img * 255).round().astype(np.uint8)).resize((image_size, image_size),
                                                                            Image.BILINEAR).convert("RGB")
               for img in images[index]]
        splits[name] = datasets.Dataset.from_dict({"image": pil, "label": labels[index].tolist()}, features=features)
    return datasets.DatasetDict(splits)
