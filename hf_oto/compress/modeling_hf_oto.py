"""Rebuild a model compressed by hf_oto from its structure manifest.

This file is copied next to the weights of every saved compressed model, so it imports only
``torch`` and ``transformers``: ``AutoModelFor*.from_pretrained(path, trust_remote_code=True)``
loads it in a fresh process, and ``hf_oto.from_pretrained(path)`` uses the installed copy.

The manifest, stored in ``config.json`` under ``hf_oto_manifest``, lists the layers replaced by
new layer types (``modules``), the new shape of every resized tensor (``shapes``), the new
value of every changed module attribute (``attributes``), the norm layers that run at their
original width on zero-padded inputs (``paddings``), the module arguments computed for every head
of which a module keeps only its own heads' positions (``inputs``) and the experts modules that lost
whole experts, whose routing is remapped (``experts``). A ``HfOto<Base>`` class builds
``<Base>`` from its config as usual, then resizes the tensors and sets the attributes, so that the
checkpoint's weights load with matching shapes (never ``ignore_mismatched_sizes``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from .hf_oto_layers import LAYER_TYPES

MANIFEST_KEY = "hf_oto_manifest"
MANIFEST_VERSION = 1
CLASS_PREFIX = "HfOto"


def _kept_index(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    # A plain list, turned into a tensor on first use per device: buffers would be re-created
    # uninitialised when from_pretrained materialises the model from the meta device.
    cache = module.__dict__.setdefault("_hf_oto_kept_cache", {})
    if device not in cache:
        cache[device] = torch.tensor(module._hf_oto_kept, dtype=torch.long, device=device)
    return cache[device]


def _pad_input(module: torch.nn.Module, args: tuple) -> tuple:
    # The removed positions were exactly zero in the trained model: putting the zeros back makes the
    # norm's mean and variance (over the full width) the same as before compression.
    x = args[0]
    dim = module._hf_oto_pad_dim % x.dim()
    shape = list(x.shape)
    shape[dim] = module._hf_oto_pad_size
    full = x.new_zeros(shape).index_copy(dim, _kept_index(module, x.device), x)
    return (full,) + tuple(args[1:])


def _keep_output(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    first = output[0] if isinstance(output, tuple) else output
    kept = first.index_select(module._hf_oto_pad_dim % first.dim(), _kept_index(module, first.device))
    return (kept,) + tuple(output[1:]) if isinstance(output, tuple) else kept


def pad_norm(module: torch.nn.Module, dim: int, size: int, kept: Any) -> None:
    """Run a norm layer at its original width: zero-pad its input, keep only ``kept`` outputs."""
    module._hf_oto_kept = [int(i) for i in kept]
    module.__dict__.pop("_hf_oto_kept_cache", None)
    module._hf_oto_pad_dim = int(dim)
    module._hf_oto_pad_size = int(size)
    if not getattr(module, "_hf_oto_padded", False):
        module.register_forward_pre_hook(_pad_input)
        module.register_forward_hook(_keep_output)
        module._hf_oto_padded = True


def _cut_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # The argument was computed for every head of the original model; the removed heads' positions
    # met only zeroed weights, so reading just the kept ones gives the same outputs.
    args, kwargs = list(args), dict(kwargs)
    for spec in module._hf_oto_cuts:
        position, name = spec["position"], spec["name"]
        if position is not None and position < len(args):
            where, key = args, position
        elif name is not None and name in kwargs:
            where, key = kwargs, name
        else:
            continue  # not passed in this call
        x = where[key]
        if not isinstance(x, torch.Tensor):
            continue
        dim = spec["dim"] % x.dim()
        kept = _kept_index_of(module, spec, x.device)
        blocks = x.unflatten(dim, (-1, spec["period"]))
        where[key] = blocks.index_select(dim + 1, kept).flatten(dim, dim + 1)
    return tuple(args), kwargs


def _kept_index_of(module: torch.nn.Module, spec: dict, device: torch.device) -> torch.Tensor:
    cache = module.__dict__.setdefault("_hf_oto_cut_cache", {})
    key = (id(spec), device)
    if key not in cache:
        cache[key] = torch.tensor(spec["kept"], dtype=torch.long, device=device)
    return cache[key]


def cut_inputs(module: torch.nn.Module, specs: list[dict[str, Any]]) -> None:
    """Make ``module`` read only the kept positions of arguments computed for all heads."""
    module._hf_oto_cuts = [dict(spec) for spec in specs]
    module.__dict__.pop("_hf_oto_cut_cache", None)
    if not getattr(module, "_hf_oto_cut", False):
        module.register_forward_pre_hook(_cut_arguments, with_kwargs=True)
        module._hf_oto_cut = True
def _routing_table(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    cache = module.__dict__.setdefault("_hf_oto_route_cache", {})
    if device not in cache:
        cache[device] = torch.tensor(module._hf_oto_expert_map, dtype=torch.long, device=device)
    return cache[device]


def _remap_routing(module: torch.nn.Module, args: tuple) -> tuple:
    # The router still picks among all its experts; a removed expert output exactly zero in the
    # trained model, so its slot gets weight zero (and any kept expert's id, to stay in range).
    args = list(args)
    ids, weights = args[module._hf_oto_index_arg], args[module._hf_oto_weight_arg]
    new = _routing_table(module, ids.device)[ids]
    args[module._hf_oto_index_arg] = new.clamp(min=0)
    args[module._hf_oto_weight_arg] = weights.masked_fill(new < 0, 0)
    return tuple(args)


def route_experts(module: torch.nn.Module, kept: Any, size: int, index_arg: int, weight_arg: int) -> None:
    """Let an experts module that kept only the experts ``kept`` (of ``size``) take the routing of
    the full router: expert ids are remapped to the kept experts' positions, removed ones weigh 0."""
    table = [-1] * int(size)
    for position, expert in enumerate(kept):
        table[int(expert)] = position
    module._hf_oto_expert_map = table
    module.__dict__.pop("_hf_oto_route_cache", None)
    module._hf_oto_index_arg = int(index_arg)
    module._hf_oto_weight_arg = int(weight_arg)
    if not getattr(module, "_hf_oto_routed", False):
        module.register_forward_pre_hook(_remap_routing)
        module._hf_oto_routed = True


def apply_structure_manifest(model: torch.nn.Module, manifest: dict[str, Any]) -> torch.nn.Module:
    """Resize tensors and set attributes of a freshly built ``model`` as the manifest says."""
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported hf_oto manifest version {manifest.get('version')!r}")
    for path, spec in manifest.get("modules", {}).items():
        layer_type = LAYER_TYPES.get(spec.get("type"))
        if layer_type is None:
            raise ValueError(f"unknown hf_oto layer type {spec.get('type')!r} for module {path!r}")
        old = model.get_submodule(path)
        new = layer_type.from_manifest(spec)
        try:
            new = new.to(device=next(old.parameters()).device)
        except StopIteration:
            pass
        model.set_submodule(path, new)
    for name, shape in manifest.get("shapes", {}).items():
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        old = getattr(module, leaf)
        if tuple(old.shape) == tuple(shape):
            continue
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            persistent = leaf not in getattr(module, "_non_persistent_buffers_set", set())
            module.register_buffer(leaf, new, persistent=persistent)
    for module_path, attributes in manifest.get("attributes", {}).items():
        module = model.get_submodule(module_path)
        for attr, value in attributes.items():
            if isinstance(getattr(module, attr, None), tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(module, attr, value)
    for module_path, spec in manifest.get("paddings", {}).items():
        pad_norm(model.get_submodule(module_path), spec["dim"], spec["size"], spec["kept"])
    for module_path, specs in manifest.get("inputs", {}).items():
        cut_inputs(model.get_submodule(module_path), specs)
    for module_path, spec in manifest.get("experts", {}).items():
        route_experts(model.get_submodule(module_path), spec["kept"], spec["size"], spec["index_arg"],
                      spec["weight_arg"])
    return model


# CPU kernels (convolutions, reductions) peel a scalar prologue until their input is aligned to a
# vector width, so the same values at another address are summed in another order. Weights loaded
# from safetensors are views into the memory-mapped file, only as aligned as their offset in it.
_ALIGNMENT = 64


@torch.no_grad()
def own_aligned_storage(model: torch.nn.Module) -> torch.nn.Module:
    """Copy every CPU parameter and buffer that is not 64-byte aligned into its own allocation.

    Without this, a reloaded model computes its outputs in a different floating-point summation
    order than the model that was saved (differences of 1e-8 relative), and its weights keep the
    checkpoint file mapped.
    """
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0
                        or tensor.data_ptr() % _ALIGNMENT == 0):
                    continue
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return model


def auto_classes_for(base_name: str) -> list[str]:
    """The Auto classes (``AutoModelForQuestionAnswering``, ...) that map to ``base_name``."""
    found = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        names = getattr(mapping, "_model_mapping", None)
        if not isinstance(names, dict):
            continue
        for value in names.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            if base_name in values:
                found.append(name)
                break
    return found


_LAYERS_FILE = "hf_oto_layers"


def keep_needed_layer_files(folder: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Leave in ``folder`` only the remote-code layer files the manifest's layer types need.

    Transformers copies ``hf_oto_layers.py`` and every file it imports; this rewrites it to import
    only the files defining the types in ``manifest["modules"]`` and deletes the others, so a
    pruned model carries no quantization or low-rank code. Returns the layer files kept.
    """
    if not os.path.isfile(os.path.join(folder, _LAYERS_FILE + ".py")):
        return []
    used = {spec.get("type") for spec in manifest.get("modules", {}).values()}
    needed = sorted({LAYER_TYPES[t].__module__.rpartition(".")[2] for t in used if t in LAYER_TYPES})
    lines = ['"""Layer types of this model, by name (written by hf_oto: only the files its layers need)."""', "",
             "from __future__ import annotations", ""]
    lines += [f"from .{name} import LAYER_TYPES as _{name.upper()}" for name in needed]
    lines += ["", "LAYER_TYPES: dict[str, type] = {" + ", ".join(f"**_{n.upper()}" for n in needed) + "}", ""]
    with open(os.path.join(folder, _LAYERS_FILE + ".py"), "w") as f:
        f.write("\n".join(lines))
    for entry in os.listdir(folder):
        if entry.startswith(_LAYERS_FILE + "_") and entry.endswith(".py") and entry[:-3] not in needed:
            os.remove(os.path.join(folder, entry))
    return needed


def _make_class(base_name: str, config_name: str | None = None) -> type:
    base = getattr(transformers, base_name, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"transformers has no model class named {base_name!r}")
    config_class = getattr(transformers, config_name, None) if config_name else None
    if config_name and not (isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig)):
        raise AttributeError(f"transformers has no config class named {config_name!r}")

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        manifest = getattr(config, MANIFEST_KEY, None)
        if manifest:
            apply_structure_manifest(self, manifest)

    def from_pretrained(cls, *args, **kwargs):
        loaded = base.from_pretrained.__func__(cls, *args, **kwargs)
        own_aligned_storage(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def save_pretrained(self, save_directory, *args, hf_oto_standard: bool = True, **kwargs):
        if hf_oto_standard:
            try:  # with hf_oto installed, a layer-uniform model is saved as its base class
                from hf_oto.compress.standard import save_standard
            except ImportError:  # this file running as remote code without hf_oto: keep the manifest
                save_standard = None
            if save_standard is not None and not save_standard(self, save_directory, *args, **kwargs):
                return None
        autos = auto_classes_for(base_name) or ["AutoModel"]
        type(self)._auto_class = autos[0]
        reference = f"{__name__.rpartition('.')[2]}.{type(self).__name__}"
        self.config.auto_map = {auto: reference for auto in autos}
        result = base.save_pretrained(self, save_directory, *args, **kwargs)
        keep_needed_layer_files(save_directory, getattr(self.config, MANIFEST_KEY, None) or {})
        return result

    namespace = {
        "__init__": __init__,
        "from_pretrained": classmethod(from_pretrained),
        "save_pretrained": save_pretrained,
        "__module__": __name__,
        "__doc__": f"{base_name} with the per-layer sizes of an hf_oto structure manifest.",
    }
    # Transformers decides whether a class may pick its attention / experts implementation by reading
    # the source of the class's module: this file's would say no, and a reloaded mixture of experts
    # would run its experts in the eager loop (other sums) instead of the base class's grouped_mm.
    for check in ("_can_set_attn_implementation", "_can_set_experts_implementation"):
        if hasattr(base, check):
            namespace[f"{check}_cached_value"] = bool(getattr(base, check)())
    # Nor is it remote code: it is the base class's code plus a resize. Transformers would otherwise
    # skip the base's checkpoint renamings (``lm_head`` stored as ``model.llm.unembed``) on load
    # only, as the model was saved before its class changed, and leave those weights uninitialised.
    namespace["is_custom_code"] = classmethod(lambda cls: False)
    name = f"{CLASS_PREFIX}{base_name}"
    if config_class is not None:
        # A model type served by another type's class (pp_chart2table by GotOcr2...): an Auto class
        # loading the remote code registers the class under the saved config's class and refuses
        # one whose config_class differs, so this class states the config it was compressed with.
        namespace["config_class"] = config_class
        name += _CONFIG_SEP + config_name
    cls = type(name, (base,), namespace)
    cls.__qualname__ = cls.__name__
    _share_checkpoint_conversions(base, cls.__name__)
    return cls


def _share_checkpoint_conversions(base: type, name: str) -> None:
    # A mapping keyed by the base class's name (not its model type) is found only under that name.
    try:
        from transformers import conversion_mapping
    except ImportError:  # releases without checkpoint conversions
        return
    getter = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
    register = getattr(conversion_mapping, "register_checkpoint_conversion_mapping", None)
    mapping = getter(base.__name__) if getter is not None else None
    if mapping is not None and register is not None:
        register(name, mapping, overwrite=True)


_CLASSES: dict[tuple[str, str | None], type] = {}
#: Joins the base class and the config class in the name of a class whose config is not its base's.
_CONFIG_SEP = "__"


def compressed_class(base_name: str, config_name: str | None = None) -> type:
    """The ``HfOto<base_name>`` class (created once per process); with ``config_name`` (the class
    name of the model's config) that is a Transformers config other than ``base_name``'s own,
    ``HfOto<base_name>__<config_name>``, whose ``config_class`` is that config's class."""
    if base_name.startswith(CLASS_PREFIX):
        base_name = base_name[len(CLASS_PREFIX):]
    named = _CONFIG_SEP in base_name  # a saved class name: the config it names must exist
    if named:
        base_name, config_name = base_name.split(_CONFIG_SEP, 1)
    own = getattr(getattr(transformers, base_name, None), "config_class", None)
    if config_name is not None and not named and (
            (own is not None and own.__name__ == config_name) or not hasattr(transformers, config_name)):
        config_name = None  # its own config, or one of the user's (a subclass the Auto classes do not know)
    key = (base_name, config_name)
    if key not in _CLASSES:
        _CLASSES[key] = _make_class(base_name, config_name)
    return _CLASSES[key]


def __getattr__(name: str) -> type:
    # Lets transformers (and pickle) find HfOto<Base> classes by name in this module.
    if name.startswith(CLASS_PREFIX) and len(name) > len(CLASS_PREFIX):
        return compressed_class(name[len(CLASS_PREFIX):])
    raise AttributeError(name)
