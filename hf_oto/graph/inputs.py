"""Example inputs for the dependency trace, and calling a model with them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def default_example_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Small inputs a Transformers model accepts, built from its config.

    Text models get a batch of token ids (and an attention mask), vision models a batch of
    images of ``config.image_size``. Other modules need explicit ``example_inputs``.
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise ValueError(
            f"{type(model).__name__} is not a Transformers model: pass example_inputs to find_groups "
            "(a dict of keyword arguments, a tuple of positional arguments or a tensor)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        # An odd length that is unlikely to equal any size in the model.
        ids = torch.randint(0, vocab, (2, 13), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if main == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", 64) or 64
        size = size if isinstance(size, int) else int(size[0])
        pixels = torch.randn(2, channels, size, size, generator=generator)
        return {"pixel_values": pixels.to(device)}
    raise ValueError(
        f"cannot build example inputs for main input '{main}' of {type(model).__name__}: "
        "pass example_inputs to find_groups")


def call_with(model: torch.nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a dict (keyword arguments), a tuple/list (positional) or a tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
