"""Compression methods that OTOTrainer can drive (see :mod:`hf_oto.methods.base`)."""

from __future__ import annotations

import importlib
import importlib.util

from .base import CompressionMethod, TrainingSettings, available_methods, get_method, register_method

# Modules whose import registers built-in methods. Kept lazy so that importing hf_oto stays cheap.
_BUILTIN_MODULES = [
    "hf_oto.methods.group_sparsity",  # hspg, dhspg, hesso
    "hf_oto.methods.magnitude",  # one-shot baseline
    "hf_oto.methods.sfw",
    "hf_oto.methods.dsp",
    "hf_oto.methods.opq",
]


def _load_builtin_methods() -> None:
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


__all__ = ["CompressionMethod", "TrainingSettings", "available_methods", "get_method", "register_method"]
