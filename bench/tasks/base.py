"""What every task of the comparison provides, so that every method runs on it the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass
class Budget:
    """The training budget every row of a task gets: the same for all methods.

    ``pruning_start``/``pruning_end`` are fractions of ``steps``: the window in which every pruning
    method removes structure (OTO's pruning window, the gradual schedules, the one-shot point of
    prune-then-finetune at its start); ``pruning_periods`` is how many times it does so.
    """

    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup: float = 0.06           # linear learning-rate warm-up, fraction of steps; then linear decay to 0
    max_grad_norm: float = 1.0
    pruning_start: float = 0.1
    pruning_end: float = 0.6
    pruning_periods: int = 10

    def window(self) -> tuple[int, int]:
        """``(first step, end step)`` of the pruning window, in optimizer steps."""
        start = int(round(self.pruning_start * self.steps))
        end = max(start + self.pruning_periods, int(round(self.pruning_end * self.steps)))
        if end > self.steps:
            raise ValueError(f"{self.steps} steps are too few for {self.pruning_periods} pruning periods "
                             f"starting at step {start}")
        return start, end

    def period_starts(self) -> list[int]:
        """The first step of each of the ``pruning_periods`` periods of the window."""
        start, end = self.window()
        length = (end - start) // self.pruning_periods
        return [start + p * length for p in range(self.pruning_periods)]

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up then linear decay to zero (``transformers``' default schedule)."""
        warm = max(1, int(round(self.warmup * self.steps)))
        if step < warm:
            return self.learning_rate * (step + 1) / warm
        return self.learning_rate * max(0.0, (self.steps - step) / max(1, self.steps - warm))

    def scaled(self, steps: int | None = None) -> "Budget":
        """The same budget with another number of steps (the window keeps its fractions)."""
        return Budget(**{**self.__dict__, "steps": steps or self.steps})


@dataclass
class TorchPruningSpec:
    """How Torch-Pruning is set up for a model, as its documentation does for that family."""

    output_transform: Callable[[Any], torch.Tensor]
    ignored_layers: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    after_pruning: Callable[[nn.Module, Any], None] | None = None  # fix attributes (head counts)
    heads_left: Callable[[Any], int] | None = None  # heads the pruner's global head ranking sees now


@dataclass
class AuthorsOTOSpec:
    """How the authors' ``only_train_once`` package is set up for a model."""

    dummy_input: Any                     # what their tracer calls the model with
    unprunable_params: list[str] = field(default_factory=list)  # groups kept, to match hf_oto's structures
    eager_attention: bool = False        # their ONNX-based tracer cannot export SDPA


class Task:
    """A model, its data, its loss and its quality metric.

    Subclasses set ``name``, ``metric`` (the primary quality number, higher is better), ``metrics``
    (everything reported), ``budget`` and ``description``, and implement the methods below. Data
    and metrics must be deterministic: the same seed gives the same batches on every call.
    """

    name: str = ""
    metric: str = ""
    metrics: tuple[str, ...] = ()
    budget: Budget
    description: str = ""
    #: Range the dense model's primary metric should land in for the task to tell methods apart.
    discriminative_range: tuple[float, float] | None = None

    def build_model(self, seed: int) -> nn.Module:
        """The starting model (pretrained weights, a fresh head or a fresh init from ``seed``)."""
        raise NotImplementedError

    def train_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches of ``budget.batch_size``, reshuffled every epoch, from ``seed``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Quality on the held-out data (``metrics``), the model in eval mode."""
        raise NotImplementedError

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two examples: for the dependency trace and the FLOPs of every row (the same inputs)."""
        raise NotImplementedError

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        """The batch CPU latency is measured on."""
        return self.example_inputs()

    def dense_reference(self, seed: int) -> nn.Module | None:
        """The model a compressed one is compared with, when it is not a dense training run of the
        same budget (distillation: the teacher). ``None``: train the dense model."""
        return None

    def torch_pruning_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> TorchPruningSpec:
        """``inputs``: the example inputs, on the model's device."""
        raise NotImplementedError

    def authors_oto_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> AuthorsOTOSpec:
        """``inputs``: the example inputs, on the model's device."""
        raise NotImplementedError


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epoch_batches(tensors: dict[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled mini-batches over equally long tensors; a new permutation every epoch,
    drawn from a generator seeded with ``seed`` (nothing else's random state is touched)."""
    n = len(next(iter(tensors.values())))
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than one batch of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            index = order[i:i + batch_size]
            yield {k: v[index] for k, v in tensors.items()}
