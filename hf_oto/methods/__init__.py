"""Compression methods that OTOTrainer can drive (see :mod:`hf_oto.methods.base`)."""

from __future__ import annotations

import importlib

from .base import CompressionMethod, TrainingSettings, available_methods, get_method, register_method

# Modules whose import registers built-in methods. Kept lazy so that importing hf_oto stays cheap.
_BUILTIN_MODULES: list[str] = []


def _load_builtin_methods() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


__all__ = ["CompressionMethod", "TrainingSettings", "available_methods", "get_method", "register_method"]
