"""Where a forward pass failed: the innermost module and the op (or line of model code)."""

from __future__ import annotations

import linecache
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Failure:
    """A forward pass that raised: in which module, at which op, with which message."""

    module: str  # module path ("" for the model itself or code outside any module)
    op: str  # the ATen op that raised, or the line of code
    message: str

    def __str__(self) -> str:
        return f"module '{self.module or '<model>'}' fails at {self.op}: {self.message}"


class LastOp(TorchDispatchMode):
    """Remembers the op that raised. Subclasses change how ops run in :meth:`run_op`."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: tuple[BaseException, str] | None = None

    def run_op(self, func, args, kwargs):
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return self.run_op(func, args, kwargs or {})
        except Exception as exc:
            if self.failed is None or self.failed[0] is not exc:
                self.failed = (exc, str(func))
            raise


def locate(model: torch.nn.Module, exc: BaseException, op: str | None = None) -> Failure:
    """The innermost module of ``model`` on the traceback of ``exc``, and the op or code line."""
    names = {id(m): n for n, m in model.named_modules()}
    module, line = None, None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = names[id(owner)]
            source = linecache.getline(frame.f_code.co_filename, lineno).strip()
            line = f"{os.path.basename(frame.f_code.co_filename)}:{lineno} `{source}`"
    message = " ".join(str(exc).split())[:300] or type(exc).__name__
    return Failure(module if module is not None else "", op or line or type(exc).__name__, message)


def run_located(model: torch.nn.Module, call: Callable[[], Any], tracker: LastOp | None = None) -> Failure | None:
    """Run ``call`` (a forward of ``model``); None if it returns, else where it failed."""
    tracker = tracker or LastOp()
    try:
        with tracker:
            call()
    except Exception as exc:  # any failure of the model code is reported, whatever its type
        op = tracker.failed[1] if tracker.failed is not None and tracker.failed[0] is exc else None
        return locate(model, exc, op)
    return None
