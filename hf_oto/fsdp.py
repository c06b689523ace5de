"""OTOTrainer under FSDP2 (accelerate's ``fsdp_version: 2``, ``torch.distributed.fsdp.fully_shard``).

The optimizers work on row shards (see :mod:`hf_oto.optim._sharding`); what the Trainer adds is the
end of training: the full weights are gathered on rank 0, which builds a dense copy of the model,
compresses it (:func:`hf_oto.compress` checks that the outputs are unchanged) and saves it with
the card. Only rank 0 ever holds the full model.

DeepSpeed ZeRO and FSDP1 are refused: they shard flat buffers that cut through a group's rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Why the other sharding schemes are refused (a shard there is a slice of a flattened buffer).
FLAT_SHARDING = ("shard flat buffers of parameters and optimizer state, so a shard cuts through the rows and "
                 "columns of a zero-invariant group and no process can address its positions")


def fsdp_version(accelerator: Any) -> int | None:
    """1 or 2 when ``accelerator`` runs FSDP, None otherwise."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1) or 1)


def check_sharding(accelerator: Any, deepspeed: bool, fsdp: bool, method: Any) -> bool:
    """Raise ValueError for sharding OTOTrainer cannot train with; True under FSDP2.

    Example:
        >>> from types import SimpleNamespace
        >>> from hf_oto.methods import get_method
        >>> plain = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
        >>> check_sharding(plain, deepspeed=False, fsdp=False, method=get_method("hesso")())
        False
    """
    if deepspeed:
        raise ValueError(f"OTOTrainer does not support DeepSpeed ZeRO: ZeRO stages {FLAT_SHARDING}. Shard with FSDP2 "
                         "(fsdp=True, fsdp_config={'fsdp_version': 2}) or train with DDP.")
    if not fsdp:
        return False
    version = fsdp_version(accelerator) or 1
    if version != 2:
        import accelerate

        # accelerate learnt FSDP2 (fsdp_version) in 1.6: before it, every FSDP run is FSDP1.
        upgrade = ("" if hasattr(accelerate.utils.FullyShardedDataParallelPlugin, "fsdp_version") else
                   f" FSDP2 needs accelerate >= 1.6 (installed: {accelerate.__version__}).")
        raise ValueError(f"OTOTrainer does not support FSDP1: its FlatParameters {FLAT_SHARDING}. Use FSDP2 "
                         "(fsdp_config={'fsdp_version': 2}), which shards every parameter by rows." + upgrade)
    from .methods.group_sparsity import GroupSparsityMethod

    if not isinstance(method, GroupSparsityMethod):
        raise ValueError(f"under FSDP2 OTOTrainer supports the group-sparsity methods (hesso, dhspg, hspg); "
                         f"{getattr(method, 'name', type(method).__name__)!r} needs whole tensors on every process: "
                         "train it with DDP")
    return True


def _base_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps it for a subclass of FSDPModule and the original."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 has sharded it)."""
    from .optim._sharding import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


@torch.no_grad()
def gather_dense_model(model: nn.Module, everywhere: bool = False) -> nn.Module | None:
    """A plain (unsharded) copy of an FSDP2 model on rank 0, on CPU; None on the other ranks
    (with ``everywhere``, a copy on every rank).

    Every rank must call it (the weights are all-gathered). The copy is built from the model's
    config (random initialisation skipped) and loads the full state dict, so non-persistent
    buffers (rotary tables, position ids) are the ones the class builds.

    Example:
        >>> dense = gather_dense_model(trainer.model)       # doctest: +SKIP
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if not everywhere and dist.get_rank() != 0:
        return None
    state = {k: v.detach().cpu() for k, v in state.items()}
    from transformers.initialization import no_init_weights

    with no_init_weights():
        dense = _base_class(model)(model.config)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        dense.to(dtypes.pop())
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(dense)]
    if missing or unexpected:
        raise RuntimeError(f"the gathered weights do not fit a fresh {type(dense).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return dense.train(model.training)


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with another key (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr in seen:
            tied.add(name)
        else:
            seen[ptr] = name
    return tied


def broadcast_object(obj: Any) -> Any:
    """``obj`` from rank 0 on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
