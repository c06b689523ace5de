"""The authors' own library, ``only-train-once`` (PyPI, tianyic/only_train_once), running HESSO.

It does not import on current torch as published: ``only_train_once.graph`` imports
``torch.onnx._globals`` and calls ``torch.onnx._optimize_graph``, which torch moved to
``torch.onnx._internal.torchscript_exporter``. :func:`compatibility_shim` points the old names at
the new module (for this bench only, never in hf_oto); and its HESSO allocates one mask with
``.cuda()``, so on a machine without CUDA the shim makes ``Tensor.cuda`` a no-op while the
optimizer steps. Set up as its README does: ``OTO(model, dummy_input)``, ``oto.hesso(...)``,
``oto.construct_subnet()``; the groups holding parameters hf_oto's default never prunes (the
hidden width of a Transformer, a ConvNeXt's LayerNorm-normalised channels) are marked unprunable,
so that it prunes the same kinds of structure as hf_oto (``bench/tasks/families.py``). It has no
FLOPs target: its group sparsity is calibrated like hf_oto's stand-in. Where it fails, the table
records where and why.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import types

import torch
from torch import nn

from hf_oto import find_groups

from .base import Method, RunContext
from .targets import FlopsTarget


def compatibility_shim() -> None:
    """Make ``import only_train_once`` work on torch >= 2.9 (see the module docstring) and on
    Python >= 3.12, which removed the module ``imp`` that one of its files imports and never uses
    (seen on a GPU machine with Python 3.12: the row was "not run: No module named 'imp'")."""
    if importlib.util.find_spec("imp") is None:
        sys.modules.setdefault("imp", types.ModuleType("imp"))
    if "torch.onnx._globals" in sys.modules:
        return
    try:
        importlib.import_module("torch.onnx._globals")
        return
    except ModuleNotFoundError:
        pass
    from torch.onnx._internal.torchscript_exporter import _globals, utils

    sys.modules["torch.onnx._globals"] = _globals
    if not hasattr(torch.onnx, "_optimize_graph"):
        torch.onnx._optimize_graph = utils._optimize_graph


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """``Tensor.cuda()`` returns the tensor itself while CUDA is unavailable (their HESSO calls it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class _ShimmedOptimizer:
    """Their optimizer, stepped inside :func:`cuda_calls_stay_on_cpu` (what the loop needs of it:
    ``param_groups``, ``step``, ``zero_grad``)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.param_groups = inner.param_groups

    def step(self, closure=None):
        with cuda_calls_stay_on_cpu():
            return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)


class AuthorsHESSO(Method):
    name = "only-train-once HESSO (authors)"
    family = "peer"

    def available(self) -> str | None:
        if importlib.util.find_spec("only_train_once") is None:
            return "only-train-once is not installed"
        try:
            compatibility_shim()
            importlib.import_module("only_train_once")
        except Exception as err:  # noqa: BLE001 - the reason goes into the table
            return f"import fails: {type(err).__name__}: {err}"
        return None

    def start(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from only_train_once import OTO

        spec = self.spec = ctx.task.authors_oto_spec(model, ctx.example_inputs)
        groups = find_groups(model, ctx.example_inputs)  # only to calibrate the sparsity to the FLOPs target
        self.sparsity = FlopsTarget(model, groups, ctx.example_inputs).uniform_sparsity(ctx.target_kept_flops)
        ctx.notes.append(f"group sparsity {self.sparsity:.3f} calibrated to the FLOPs target")
        if spec.eager_attention:
            model.set_attn_implementation("eager")
        was_training = model.training
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # it prints its progress
            dummy = spec.dummy_input[0] if len(spec.dummy_input) == 1 else spec.dummy_input
            self.oto = OTO(model, dummy)
            if spec.unprunable_params:
                self.oto.mark_unprunable_by_param_names(spec.unprunable_params)
        model.train(was_training)
        return model

    def optimizer(self, model: nn.Module, ctx: RunContext):
        budget = ctx.budget
        start, end = budget.window()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            inner = self.oto.hesso(variant="adamw", lr=budget.learning_rate, weight_decay=budget.weight_decay,
                                   first_momentum=0.9, second_momentum=0.999, target_group_sparsity=self.sparsity,
                                   start_pruning_step=start, pruning_steps=end - start,
                                   pruning_periods=budget.pruning_periods)
        return _ShimmedOptimizer(inner)

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(open(os.devnull, "w")):
            self.oto.construct_subnet(out_dir=folder)
            small = torch.load(self.oto.compressed_model_path, weights_only=False)
        if self.spec.eager_attention:
            small.set_attn_implementation("sdpa")  # time it with the attention the other rows use
        return small
