"""Save and load compressed models without remote code, and plain PyTorch modules."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .manifest import get_manifest
from .modeling_hf_oto import MANIFEST_KEY, apply_structure_manifest, compressed_class

PLAIN_MANIFEST_FILE = "hf_oto_structure.json"
PLAIN_WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a compressed model. Transformers models use their own ``save_pretrained`` (config with
    the manifest, safetensors weights, modeling file); plain modules get safetensors weights and
    ``hf_oto_structure.json``.

    Example:
        >>> hf_oto.save_pretrained(small_cnn, "out/cnn")                       # doctest: +SKIP
        >>> again = hf_oto.from_pretrained("out/cnn", model=MyCNN())           # doctest: +SKIP
    """
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(save_directory, **kwargs)
        return
    os.makedirs(save_directory, exist_ok=True)
    manifest = {**get_manifest(model), "base_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    with open(os.path.join(save_directory, PLAIN_MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    save_model(model, os.path.join(save_directory, PLAIN_WEIGHTS_FILE))


def from_pretrained(path: str | os.PathLike, model: torch.nn.Module | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load a model saved by hf_oto, with its compressed sizes, without ``trust_remote_code``.

    For Transformers checkpoints the class comes from the manifest's ``base_class``; for plain
    modules pass a freshly built, uncompressed ``model`` of the same class to receive the weights.
    Extra keyword arguments go to ``from_pretrained`` of the Transformers class.

    Example:
        >>> small = hf_oto.from_pretrained("out/compressed")                   # doctest: +SKIP
        >>> cnn = hf_oto.from_pretrained("out/cnn", model=MyCNN())              # doctest: +SKIP
    """
    plain = os.path.join(path, PLAIN_MANIFEST_FILE)
    if os.path.isfile(plain):
        if model is None:
            raise ValueError(f"{path} holds a plain PyTorch module: pass model=<a fresh instance of its class>")
        with open(plain) as f:
            manifest = json.load(f)
        apply_structure_manifest(model, manifest)
        load_model(model, os.path.join(path, PLAIN_WEIGHTS_FILE))
        model._hf_oto_manifest = manifest
        return model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    manifest = getattr(config, MANIFEST_KEY, None)
    if not manifest:
        raise ValueError(f"{path} has no '{MANIFEST_KEY}' in its config.json: it was not saved by hf_oto")
    return compressed_class(manifest["base_class"]).from_pretrained(path, **kwargs)
