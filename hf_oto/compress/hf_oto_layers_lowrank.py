"""Layers that low-rank decomposition puts into a compressed model (see hf_oto_layers.py). torch only."""

from __future__ import annotations

LAYER_TYPES: dict[str, type] = {}
