"""Save and load compressed models without remote code, and plain PyTorch modules."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .manifest import get_manifest
from .modeling_hf_oto import MANIFEST_KEY, apply_structure_manifest, compressed_class

logger = logging.getLogger(__name__)

PLAIN_MANIFEST_FILE = "hf_oto_structure.json"
PLAIN_WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, standard: bool = True,
                    **kwargs: Any) -> str:
    """Save a compressed model; returns why it needs hf_oto's manifest ("" when it does not).

    A Transformers model whose layers are uniform and whose class's config can state its sizes is
    saved as that class with a standard config (no manifest, no remote code: plain
    ``AutoModelFor*.from_pretrained`` loads it anywhere); pass ``standard=False`` to keep the
    manifest anyway. Other Transformers models are saved with the manifest and the remote-code
    files their layers need; plain modules get safetensors weights and ``hf_oto_structure.json``.

    Example:
        >>> why = hf_oto.save_pretrained(small, "out/small")                   # doctest: +SKIP
        >>> hf_oto.save_pretrained(small_cnn, "out/cnn")                       # doctest: +SKIP
        >>> again = hf_oto.from_pretrained("out/cnn", model=MyCNN())           # doctest: +SKIP
    """
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from .standard import save_standard

        why = save_standard(model, save_directory, **kwargs) if standard else "standard=False was asked for"
        if why:
            if getattr(model.config, MANIFEST_KEY, None):
                level = logging.INFO if why.startswith("layers differ") else logging.WARNING
                logger.log(level, "saving %s with the hf_oto manifest (it needs hf_oto or trust_remote_code to "
                           "load): %s", type(model).__name__, why)
                model.save_pretrained(save_directory, hf_oto_standard=False, **kwargs)
            else:
                model.save_pretrained(save_directory, **kwargs)
        return why
    os.makedirs(save_directory, exist_ok=True)
    manifest = {**get_manifest(model), "base_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    with open(os.path.join(save_directory, PLAIN_MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    save_model(model, os.path.join(save_directory, PLAIN_WEIGHTS_FILE))
    return "it is a plain PyTorch module"


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
        # A standard config (a layer-uniform model saved as its own class): its class loads it.
        import transformers

        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise ValueError(f"{path} has no '{MANIFEST_KEY}' and no known architecture in its config.json")
        return cls.from_pretrained(path, **kwargs)
    return compressed_class(manifest["base_class"], type(config).__name__).from_pretrained(path, **kwargs)
