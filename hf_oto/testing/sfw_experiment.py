"""A small, seeded robustness experiment: SFW versus SGD, compressed without retraining.

A random teacher labels random inputs; a student (an MLP, or a small CNN on synthetic images) is
trained once with SFW (compression-aware) and once with SGD, then each is pruned
(``compress(model, groups, ratio=r)``: the r fraction of neurons / channels with the smallest norms
is removed) and, separately, truncated to low rank (``decompose_low_rank(model, rank_ratio=r)``),
and evaluated with no retraining. Used by ``tests/test_sfw_robustness.py`` and
``bench/sfw_robustness.py``; everything runs on CPU in seconds.

The low-rank curves leave the classifier layer alone (``LOW_RANK_EXCLUDE``), for both optimizers:
a 10-class output layer has rank 10, and cutting it to 3 caps what any training can do.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: The classifier, left out of low-rank truncation (module paths of :func:`mlp` and :func:`cnn`).
LOW_RANK_EXCLUDE = [r"^4$", r"^head$"]


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def teacher_data(n_train: int = 16384, n_test: int = 2048, dim: int = 32, classes: int = 10, hidden: int = 128,
                 sharpness: float = 1.5, seed: int = 0) -> Data:
    """Inputs ~ N(0, I); labels = argmax of a random two-layer tanh teacher (learnable, not linear)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, hidden, generator=g) / dim ** 0.5
    w2 = torch.randn(hidden, classes, generator=g) / hidden ** 0.5
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = (torch.tanh(sharpness * x @ w1) @ w2).argmax(1)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _he_init(model: nn.Module) -> nn.Module:
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return model


def mlp(dim: int = 32, width: int = 128, classes: int = 10, seed: int = 0) -> nn.Module:
    """Two hidden ReLU layers with Kaiming-normal weights (the usual init of ReLU networks)."""
    torch.manual_seed(seed)
    return _he_init(nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Linear(width, classes)))


def image_data(n_train: int = 8192, n_test: int = 2048, classes: int = 10, size: int = 12, seed: int = 0) -> Data:
    """Noisy, randomly shifted copies of one smooth random template per class (3 x size x size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 3, size // 3, size // 3, generator=g)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    n = n_train + n_test
    y = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([templates[c].roll((int(a), int(b)), dims=(1, 2)) for c, (a, b) in zip(y.tolist(), shifts)])
    x = 0.6 * x + torch.randn(x.shape, generator=g)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU x2, max-pool, conv1x1-BN-ReLU, global average pool, linear head."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def cnn(classes: int = 10, width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _he_init(SmallCNN(classes, width))


@dataclass
class TrainConfig:
    """One training run; JSON-able (``asdict``)."""

    optimizer: str = "sfw"                 # "sfw" or "sgd"
    structure: str = "prune"               # SFW structure (see SFW.from_model)
    lr: float = 1.0
    momentum: float = 0.9
    k: float = 0.3
    radius_factor: float = 2.0
    weight_decay: float = 0.0              # SGD only
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.optimizer == "sgd":
            return f"SGD lr={self.lr} wd={self.weight_decay:g}"
        return f"SFW {self.structure} lr={self.lr} k={self.k} radius x{self.radius_factor:g}"


#: The recipes the test and the benchmark compare (SGD: the usual momentum 0.9 / weight decay 5e-4).
SGD = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4)
SGD_STRONG_WD = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-3)
SFW_PRUNE = TrainConfig(optimizer="sfw", structure="prune")
SFW_LOW_RANK = TrainConfig(optimizer="sfw", structure="low_rank")


def train(model: nn.Module, data: Data, cfg: TrainConfig, groups=None) -> nn.Module:
    """Minibatch training with a linear learning-rate decay to 0; returns the model in eval mode.

    Runs on one thread: these layers are too small to gain from more, and on a busy machine
    extra threads mostly wait for each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, data, cfg, groups)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, data: Data, cfg: TrainConfig, groups=None) -> nn.Module:
    from ..optim.sfw import SFW

    if cfg.optimizer == "sfw":
        opt: torch.optim.Optimizer = SFW.from_model(model, groups, structure=cfg.structure, lr=cfg.lr,
                                                    momentum=cfg.momentum, k=cfg.k,
                                                    radius_factor=cfg.radius_factor, **cfg.extra)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    g = torch.Generator().manual_seed(cfg.seed)
    n = data.train_x.shape[0]
    per_epoch = n // cfg.batch_size
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / max(1, total))
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def prune_curve(model: nn.Module, groups, data: Data, ratios: Sequence[float],
                scope: str = "global") -> dict[float, float]:
    """Test accuracy after removing the ``r`` fraction of smallest groups, no retraining: one
    global ranking or the same share of every layer (``compress(model, groups, ratio=r, scope=scope)``)."""
    from ..compress import compress

    def pruned(r: float) -> nn.Module:
        return compress(model, groups, ratio=r, scope=scope) if r > 0 else model

    return {r: accuracy(pruned(r), data.test_x, data.test_y) for r in ratios}


def low_rank_curve(model: nn.Module, data: Data, ratios: Sequence[float],
                   exclude: Sequence[str] = tuple(LOW_RANK_EXCLUDE)) -> dict[float, float]:
    """Test accuracy after ``decompose_low_rank(model, rank_ratio=r)``, no retraining."""
    from ..compress.lowrank import decompose_low_rank

    return {r: accuracy(decompose_low_rank(model, r, exclude=list(exclude)) if r > 0 else model,
                        data.test_x, data.test_y) for r in ratios}


@dataclass
class RunResult:
    label: str
    config: dict[str, Any]
    train_seconds: float
    dense: float
    prune: dict[float, float]
    low_rank: dict[float, float]
    prune_layer: dict[float, float] = field(default_factory=dict)


def run(build: Callable[[], nn.Module], data: Data, cfg: TrainConfig, ratios: Sequence[float],
        curves: Sequence[str] = ("prune", "low_rank")) -> RunResult:
    """Train one model with ``cfg`` and measure the requested compression curves
    (``"prune"``, ``"prune_layer"``: the same share of every layer, ``"low_rank"``)."""
    from ..graph import find_groups

    torch.manual_seed(cfg.seed)
    model = build()
    groups = find_groups(model, (data.train_x[:2],))
    start = time.perf_counter()
    train(model, data, cfg, groups)
    seconds = time.perf_counter() - start
    ratios = [r for r in ratios if r > 0]
    return RunResult(cfg.label, asdict(cfg), seconds, accuracy(model, data.test_x, data.test_y),
                     prune_curve(model, groups, data, ratios) if "prune" in curves else {},
                     low_rank_curve(model, data, ratios) if "low_rank" in curves else {},
                     prune_curve(model, groups, data, ratios, scope="layer") if "prune_layer" in curves else {})
