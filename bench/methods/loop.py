"""One training loop for every row: same batches, steps, schedule and clipping; then the same
measurements (quality, parameters, FLOPs with :func:`hf_oto.measure.count_flops` on the final
physical model, CPU latency against the dense model in the same measurement)."""

from __future__ import annotations

import random
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_oto.measure import count_flops, measure_latency, num_parameters

from ..tasks.base import Budget, Task, to_device
from .base import Dense, Method, RunContext


@dataclass
class RunResult:
    task: str
    method: str
    family: str
    seed: int
    target_kept_flops: float | None
    steps: int = 0
    extra_passes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    params: int = 0
    flops: int = 0
    kept_flops: float = 1.0
    latency_s: float = 0.0
    dense_latency_s: float = 0.0
    latency_ratio: float = 0.0          # compressed / dense CPU latency, measured together
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(task: Task, method: Method, seed: int, target: float | None, budget: Budget | None = None,
          dense_flops: int | None = None, show_progress: bool = True, device: str = "cpu"
          ) -> tuple[nn.Module, RunContext]:
    """Train ``method`` on ``task`` for the budget's steps; returns the final compressed model."""
    budget = budget or task.budget
    seed_everything(seed)
    model = task.build_model(seed).to(device)
    model.train()
    inputs = to_device(task.example_inputs(), device)
    ctx = RunContext(task=task, budget=budget, seed=seed, target_kept_flops=target, example_inputs=inputs,
                     dense_flops=dense_flops or count_flops(model, inputs))
    model = method.start(model, ctx)
    optimizer = method.optimizer(model, ctx)
    batches = task.train_batches(seed)
    bar = progress_bar(budget.steps, f"{task.name} | {method.name} | {_target(target)} | seed {seed}", show_progress)
    try:
        for step in range(budget.steps):
            batch = to_device(next(batches), device)
            loss = task.loss(model, batch)
            loss.backward()
            changed = method.before_step(step, model, optimizer, batch, ctx)
            if changed is not None:
                model, optimizer = changed
            if budget.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), budget.max_grad_norm)
            lr = budget.learning_rate_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step, model, ctx)
            bar.update()
            if step % 10 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    finally:
        bar.close()
    model.eval()
    return method.finish(model, ctx).eval(), ctx


def _target(target: float | None) -> str:
    return "dense" if target is None else f"kept FLOPs {target:.2f}"


def run(task: Task, method: Method, seed: int, target: float | None, dense: nn.Module,
        budget: Budget | None = None, latency_repeats: int = 20, show_progress: bool = True,
        device: str = "cpu", cpu_latency: bool = True, keep: dict[str, nn.Module] | None = None) -> RunResult:
    """Train, then measure against ``dense`` (the reference model of this task and seed). A
    failing method gives a result with ``error`` set (where it failed and why), not an exception.
    ``keep``: where to put the final model (under the method's name), for further measurements."""
    budget = budget or task.budget
    result = RunResult(task=task.name, method=method.name, family=method.family, seed=seed,
                       target_kept_flops=target, steps=budget.steps)
    reason = method.available()
    if reason is not None:
        result.error = f"not run: {reason}"
        return result
    dense_flops = count_flops(dense, to_device(task.example_inputs(), device))
    start = time.perf_counter()
    try:
        final, ctx = train(task, method, seed, target, budget, dense_flops, show_progress, device)
    except Exception as err:  # noqa: BLE001 - the table records where and why
        result.error = _describe(err, "training or compressing")
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.extra_passes = ctx.extra_passes
    result.notes = ctx.notes
    try:
        measure(task, final, dense, result, latency_repeats if cpu_latency else 0)
    except Exception as err:  # noqa: BLE001
        result.error = _describe(err, "running the compressed model")
        result.metrics = {}
        return result
    if keep is not None:
        keep[method.name] = final
    return result


def _describe(err: Exception, phase: str) -> str:
    """Where (the innermost frame) and why a run failed, on one line."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    message = str(err).splitlines()[0][:200] if str(err) else ""
    return f"failed {phase}: {type(err).__name__} in {frame.name} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}): " \
           f"{message}"


def measure(task: Task, model: nn.Module, dense: nn.Module, result: RunResult, latency_repeats: int = 20) -> None:
    """Quality, size, FLOPs and CPU latency of ``model``, the latter measured interleaved with
    ``dense`` so that machine load affects both alike (``latency_repeats=0``: no latency)."""
    with torch.no_grad():
        result.metrics = task.evaluate(model)
        result.params = num_parameters(model)
        result.flops = count_flops(model, to_device(task.example_inputs(), next(model.parameters()).device))
        result.kept_flops = result.flops / count_flops(dense, to_device(task.example_inputs(),
                                                                        next(dense.parameters()).device))
        if not latency_repeats:
            return
        batch = task.latency_inputs()
        number = passes_per_sample(dense, batch)
        rounds = [measure_latency(dense, model, inputs=batch, repeats=max(1, latency_repeats // 5), warmup=1,
                                  number=number) for _ in range(5)]
    # Five short rounds, each comparing the two models interleaved; the median of the rounds'
    # ratios resists load that changes within a round better than one ratio of medians.
    result.dense_latency_s = statistics.median(d for d, _ in rounds)
    result.latency_s = statistics.median(m for _, m in rounds)
    result.latency_ratio = statistics.median(m / d for d, m in rounds)


def passes_per_sample(model: nn.Module, inputs: dict[str, torch.Tensor], seconds: float = 0.05) -> int:
    """Forward passes per latency sample so that one sample lasts about ``seconds`` (a single
    pass of a small model is shorter than the scheduler's noise on a shared machine)."""
    from hf_oto.graph.inputs import call_with

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_with(model, inputs)
            start = time.perf_counter()
            call_with(model, inputs)
            once = time.perf_counter() - start
    finally:
        model.train(was_training)
    return max(1, min(50, int(seconds / max(once, 1e-6))))


def dense_reference(task: Task, seed: int, budget: Budget | None = None, show_progress: bool = True,
                    device: str = "cpu", cpu_latency: bool = True) -> tuple[nn.Module, RunResult]:
    """The dense model of a task and seed (trained with the same budget, or the task's own
    reference such as a distillation teacher) and its row."""
    budget = budget or task.budget
    result = RunResult(task=task.name, method="dense", family="dense", seed=seed, target_kept_flops=None,
                       steps=budget.steps)
    start = time.perf_counter()
    model = task.dense_reference(seed)
    if model is None:
        model, _ = train(task, Dense(), seed, None, budget, show_progress=show_progress, device=device)
    else:
        model = model.to(device)
        result.steps = 0
        result.notes.append("the dense model is the task's reference (not trained)")
    result.seconds = time.perf_counter() - start
    measure(task, model, model, result, latency_repeats=5 if cpu_latency else 0)
    return model, result
