"""Describe a compressed model by a standard config of its own Transformers class, when one can.

A model compressed with layer-uniform selection (``uniform_layers``) has the same sizes in every
layer. If its class reads those sizes from config fields (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``n_inner``...), the compressed model
*is* an ordinary instance of that class with other config values: it can be saved with no
``hf_oto_manifest``, no ``auto_map`` and no remote code, and serving tools that read only standard
configs load it.

Nothing here is specific to an architecture. The candidate values come from the compressed
tensor shapes (a head-count field scales by the ratio of kept to dense size of the dims that
changed; an FFN width field takes one of the new sizes), and a candidate config is accepted only
when the class built from it on the meta device has exactly the compressed model's tensor shapes
and the module attributes compression set. Where no candidate matches (a class deriving the head
size from ``hidden_size / num_attention_heads``, layers of different sizes, hf_oto layer types),
the reason is returned so that saving falls back to the manifest and says why.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from .modeling_hf_oto import CLASS_PREFIX, MANIFEST_KEY

logger = logging.getLogger(__name__)

#: Name fragments of config fields that count attention heads (``head_dim`` is handled apart).
_HEAD_FIELDS = ("heads", "n_head")
#: Name fragments of config fields that give a feed-forward width.
_FFN_FIELDS = ("intermediate", "inner", "ffn", "d_ff", "hidden_dim")
#: Manifest sections that no standard config can describe, and why.
_NONSTANDARD_SECTIONS = {
    "modules": "layers were replaced by hf_oto layer types ({})",
    "paddings": "norm layers run at their original width on zero-padded inputs ({})",
    "inputs": "modules read only the kept heads of arguments computed for all heads ({})",
    "experts": "experts modules lost whole experts and remap their routing ({})",
}


def standard_config(model: nn.Module) -> tuple[Any | None, str]:
    """``(config, "")`` when a config of the model's own class describes its compressed sizes,
    else ``(None, reason)``. The returned config is a copy without the manifest and ``auto_map``.

    Example:
        >>> small = hf_oto.compress(model, groups)            # doctest: +SKIP
        >>> config, why = standard_config(small)               # doctest: +SKIP
        >>> config.intermediate_size if config else why        # doctest: +SKIP
        58
    """
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        return None, "it is not a Transformers model"
    manifest = getattr(config, MANIFEST_KEY, None) or {}
    for section, why in _NONSTANDARD_SECTIONS.items():
        if manifest.get(section):
            return None, why.format(", ".join(sorted(manifest[section])[:3]))
    base = _base_class(model)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    uneven = _uneven_layers(target)
    if uneven:
        return None, uneven
    plain = _plain_copy(config)
    config, mismatch = _search(plain, base, target, manifest.get("attributes", {}))
    if mismatch is None:
        return config, ""
    return None, f"no {base.__name__} config reproduces the compressed sizes: {mismatch[1]}{_hint(plain)}"


def save_standard(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> str:
    """Save ``model`` as its base class with a standard config if it has one; returns ``""`` when
    saved that way, else the reason (nothing is written then, and the caller saves the manifest)."""
    config, why = standard_config(model)
    if config is None:
        return why
    base = _base_class(model)
    old_class, old_config = type(model), model.config
    # Swap the class and the config objects of the model and of every submodule sharing its config,
    # save, and swap back: the in-memory model stays the HfOto one the caller holds.
    sharing = [m for m in model.modules() if getattr(m, "config", None) is old_config]
    try:
        model.__class__ = base
        for m in sharing:
            m.config = config
        base.save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        model.__class__ = old_class
        for m in sharing:
            m.config = old_config
    return ""


def _base_class(model: nn.Module) -> type:
    cls = type(model)
    while cls.__name__.startswith(CLASS_PREFIX) and len(cls.__mro__) > 1:
        cls = cls.__mro__[1]
    return cls


def _plain_copy(config: Any) -> Any:
    plain = copy.deepcopy(config)
    for name in (MANIFEST_KEY, "auto_map"):
        if hasattr(plain, name):
            delattr(plain, name)
    return plain


def _uneven_layers(shapes: dict[str, tuple[int, ...]]) -> str:
    """Why tensors repeated over layers differ in shape ("" if they do not)."""
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        family = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)
        if family == name:
            continue
        if family in seen and seen[family][1] != shape:
            first, first_shape = seen[family]
            return (f"layers differ in size ({first} is {list(first_shape)}, {name} is {list(shape)}); train with "
                    "oto_uniform_layers=True (uniform_layers=True) for a standard config")
        seen.setdefault(family, (name, shape))
    return ""


def _int_fields(config: Any, fragments: tuple[str, ...]) -> dict[str, int | None]:
    found = {}
    for key, value in config.to_dict().items():
        if key == "head_dim" or not any(f in key for f in fragments):
            continue
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            found[key] = value
    return found


def _options(config: Any, base: type, target: dict[str, tuple[int, ...]]) -> dict[str, list[Any]] | None:
    """Values worth trying per size field: head counts scaled by the kept share of a dim that
    shrank, FFN widths set to one of the new sizes (None when the dense config does not build)."""
    built = _build(base, config)
    if built is None:
        return None
    dense = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    changed: set[tuple[int, int]] = set()   # (dense size, new size) of every dim that shrank
    for name, shape in target.items():
        before = dense.get(name)
        if before is not None and len(before) == len(shape):
            changed.update((b, a) for b, a in zip(before, shape) if b != a)
    options: dict[str, list[Any]] = {}
    for key, value in _int_fields(config, _HEAD_FIELDS).items():
        if value is not None:
            options[key] = sorted({value * a // b for b, a in changed if (value * a) % b == 0 and value * a >= b},
                                  reverse=True)
    for key in _int_fields(config, _FFN_FIELDS):
        options[key] = sorted({a for _, a in changed}, reverse=True)
    return {k: v for k, v in options.items() if v}


def _search(config: Any, base: type, target: dict[str, tuple[int, ...]],
            attributes: dict[str, dict[str, Any]]) -> tuple[Any, tuple[int, str] | None]:
    """Coordinate search over the size fields, each step taking the value that leaves the fewest
    tensors with a wrong shape; ``(config, None)`` on an exact match, else the closest mismatch.

    Fields act on mostly separate tensors (heads on the attention projections, FFN widths on the
    MLP), so a few passes suffice; each trial builds the model once on the meta device."""
    options = _options(config, base, target)
    if options is None:
        return config, (10**9, "the config does not build")
    current = copy.deepcopy(config)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    pinned = False
    if getattr(config, "head_dim", None) is None and isinstance(heads, int) and isinstance(hidden, int) \
            and heads and hidden % heads == 0:
        # The dense head size, stated: a no-op for the dense model, needed once the head count no
        # longer divides hidden_size (read by classes with a head_dim field, ignored by others).
        current.head_dim, pinned = hidden // heads, True
    best = _mismatch(base, current, target, attributes)
    for _ in range(3):
        improved = False
        for key, values in options.items():
            for value in values:
                if best is None:
                    break
                if getattr(current, key) == value:
                    continue
                trial = copy.deepcopy(current)
                setattr(trial, key, value)
                found = _mismatch(base, trial, target, attributes)
                if found is None or found[0] < best[0]:
                    current, best, improved = trial, found, True
        if best is None or not improved:
            break
    if best is None and pinned:  # drop the pin where the class does not need it (a cleaner config)
        trial = copy.deepcopy(current)
        del trial.head_dim
        if not hasattr(trial, "head_dim") and _mismatch(base, trial, target, attributes) is None:
            current = trial
    return current, best


def _build(base: type, config: Any) -> nn.Module | None:
    """``base(config)`` on the meta device (no memory, no init), or None for an inconsistent config."""
    try:
        with torch.device("meta"), _quiet():
            return base(copy.deepcopy(config))
    except Exception:  # an inconsistent candidate (heads not dividing, ...): not this one
        return None


def _mismatch(base: type, config: Any, target: dict[str, tuple[int, ...]],
              attributes: dict[str, dict[str, Any]]) -> tuple[int, str] | None:
    """None when ``base(config)`` matches; else (how many tensors differ, the first difference)."""
    model = _build(base, config)
    if model is None:
        return 10**9, "the config is inconsistent"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [n for n in target if shapes.get(n) != target[n]] + [n for n in shapes if n not in target]
    if wrong:
        name = wrong[0]
        return len(wrong), (f"{_changes(config)} gives {name} the shape {list(shapes.get(name, ()))}, "
                            f"not {list(target.get(name, ()))}")
    for path, attrs in attributes.items():
        module = model.get_submodule(path)
        for attr, value in attrs.items():
            got = getattr(module, attr, None)
            if (list(got) if isinstance(got, tuple) else got) != value:
                return 1, f"{_changes(config)} gives {path}.{attr} = {got!r}, not {value!r}"
    return None


def _changes(config: Any) -> str:
    return "config " + ", ".join(f"{k}={v}" for k, v in sorted(config.to_diff_dict().items())
                                 if isinstance(v, int) and not isinstance(v, bool)
                                 and any(f in k for f in _HEAD_FIELDS + _FFN_FIELDS + ("head_dim",)))


def _hint(config: Any) -> str:
    try:
        has_head_dim = "head_dim" in type(config)().to_dict()
    except Exception:
        return ""
    if has_head_dim:
        return ""
    return (f" ({type(config).__name__} has no head_dim field: its model derives the head size from the hidden "
            "size and the head count, so a model that lost heads cannot be described by it)")


class _quiet:
    """Silence Transformers' logging while candidates are built (each would warn about init)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
