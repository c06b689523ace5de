"""Recording structural changes in a model's manifest, so that saving and loading keep them."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modeling_hf_oto import MANIFEST_KEY, MANIFEST_VERSION, compressed_class


def get_manifest(model: nn.Module) -> dict[str, Any]:
    """The model's current manifest (empty sections if it was never changed)."""
    config = getattr(model, "config", None)
    found = getattr(config, MANIFEST_KEY, None) if config is not None else getattr(model, "_hf_oto_manifest", None)
    found = found or {}
    return {
        "version": MANIFEST_VERSION,
        "base_class": found.get("base_class", type(model).__name__),
        "modules": dict(found.get("modules", {})),
        "shapes": dict(found.get("shapes", {})),
        "attributes": {k: dict(v) for k, v in found.get("attributes", {}).items()},
        "paddings": {k: dict(v) for k, v in found.get("paddings", {}).items()},
        "inputs": {k: [dict(spec) for spec in v] for k, v in found.get("inputs", {}).items()},
        "experts": {k: dict(v) for k, v in found.get("experts", {}).items()},
    }


def update_manifest(
    model: nn.Module,
    *,
    shapes: dict[str, list[int]] | None = None,
    attributes: dict[str, dict[str, Any]] | None = None,
    modules: dict[str, nn.Module] | None = None,
    paddings: dict[str, dict[str, Any]] | None = None,
    inputs: dict[str, list[dict[str, Any]]] | None = None,
    experts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Merge changes into the model's manifest and store it where saving finds it.

    ``paddings`` maps norm modules to ``{"dim", "size", "kept"}`` (see ``pad_norm``); ``inputs``
    maps modules to the arguments they cut to their kept heads (see ``cut_inputs``); ``experts``
    maps experts modules to ``{"kept", "size", "index_arg", "weight_arg"}`` (see ``route_experts``).
    ``modules`` maps module paths to layers already set in the model; their classes must be
    registered in ``hf_oto_layers.LAYER_TYPES`` so that loading can rebuild them. Shapes and
    attributes recorded earlier for a replaced module are dropped. Transformers models switch to
    the ``HfOto<Base>`` class, which saves the manifest with ``save_pretrained``.

    Example:
        >>> layer = QuantizedLinear.from_linear(model.classifier)    # doctest: +SKIP
        >>> model.classifier = layer                                  # doctest: +SKIP
        >>> update_manifest(model, modules={"classifier": layer})     # doctest: +SKIP
    """
    manifest = get_manifest(model)
    for path, module in (modules or {}).items():
        spec = module.manifest_spec()
        if "type" not in spec:
            raise ValueError(f"{type(module).__name__}.manifest_spec() must name its 'type'")
        manifest["modules"][path] = spec
        prefix = path + "."
        manifest["shapes"] = {k: v for k, v in manifest["shapes"].items() if not k.startswith(prefix)}
        manifest["attributes"] = {k: v for k, v in manifest["attributes"].items()
                                  if k != path and not k.startswith(prefix)}
    manifest["shapes"].update(shapes or {})
    manifest["paddings"].update(paddings or {})
    manifest["inputs"].update(inputs or {})
    manifest["experts"].update(experts or {})
    for path, attrs in (attributes or {}).items():
        manifest["attributes"].setdefault(path, {}).update(
            {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()})
    config = getattr(model, "config", None)
    from transformers import PreTrainedModel

    if config is not None and isinstance(model, PreTrainedModel):
        record_mode_switches(model)
        setattr(config, MANIFEST_KEY, manifest)
        model.__class__ = compressed_class(manifest["base_class"], type(config).__name__)
    else:
        model._hf_oto_manifest = manifest
    return manifest


def record_mode_switches(model: nn.Module) -> dict[str, str]:
    """Write into the config the modes the model switched to while running; returns them.

    A Transformers (sub)model keeps some string settings of its config as attributes
    (``self.attention_type = config.attention_type``) and may change them at run time, rebuilding
    layers from the config as it does: BigBird and BigBird-Pegasus switch block-sparse attention to
    full attention on short inputs. The compressed model was cut in the switched state, so a reload
    from the original config would build, then switch to, full-size layers. An attribute of a
    ``PreTrainedModel`` that no longer equals its config's field of the same name is such a switch.

    Example:
        >>> record_mode_switches(small)            # after BigBird ran on a short input  # doctest: +SKIP
        {'attention_type': 'original_full'}
    """
    from transformers import PreTrainedModel

    switched: dict[str, str] = {}
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if not isinstance(sub, PreTrainedModel) or config is None:
            continue
        for key, value in config.to_dict().items():
            held = sub.__dict__.get(key)
            if isinstance(value, str) and isinstance(held, str) and held != value:
                setattr(config, key, held)
                switched[key] = held
    return switched
