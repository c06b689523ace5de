"""Train a tiny decoder with an hf_oto optimizer, one process or FSDP2 (fully_shard) across ranks.

Run by tests/test_fsdp.py alone:

    python tests/fsdp_optim.py OUT METHOD MODEL STEPS [RESUME_FROM]
    torchrun --nproc_per_node 2 tests/fsdp_optim.py OUT METHOD MODEL STEPS [RESUME_FROM]

Every run sees the same global batches; under FSDP2 each rank takes its share of the rows and
FSDP averages the gradients, which equals the one-process mean loss (equal token counts). Rank 0
writes the full (gathered) weights and the zero groups; every rank writes its optimizer-state size.
With RESUME_FROM, the run loads the sharded checkpoint a previous run saved after STEPS // 2 steps
and takes the remaining steps.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from hf_oto import find_groups
from hf_oto.distributed import leave_process_group
from hf_oto.optim import DHSPG, HESSO
from hf_oto.testing.zoo import llama_gqa, mixtral_moe

GLOBAL_BATCH, LENGTH = 4, 12
DTYPE = getattr(torch, os.environ.get("FSDP_TEST_DTYPE", "float64"))


def build(method: str, model_name: str):
    torch.manual_seed(0)
    model, inputs = {"llama": llama_gqa, "mixtral": mixtral_moe, "mlp": mlp}[model_name]()
    # float64: splitting the batch changes the gradient's rounding (a mean of two half-batch means),
    # which Adam's normalisation magnifies to ~1e-6 in float32 within a few steps; in float64 what is
    # left to compare is the optimizer's own sharded arithmetic.
    model = model.to(DTYPE)
    groups = find_groups(model, inputs)  # on the dense model, before sharding
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.model.layers if model_name != "mlp" else [m for m in model if isinstance(m, nn.Linear)]):
            fully_shard(layer)
        fully_shard(model)
    cls = {"hesso": HESSO, "dhspg": DHSPG}[method]
    kwargs = dict(variant="adamw", lr=1e-2, weight_decay=0.01, target_group_sparsity=0.4, start_pruning_step=2,
                  pruning_steps=4, pruning_periods=2)
    if method == "dhspg":
        kwargs["selection"] = {"saliency": "mixed"}  # the published saliency: the direction statistics
    return model, groups, cls(model, groups, **kwargs)


def mlp():
    """Widths 7, 5 and 1 split unevenly over 2 ranks (4 + 3 rows, 3 + 2, 1 + 0: a rank without rows)."""
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1))
    return model, (torch.randn(2, 6, dtype=DTYPE),)


def loss(model, model_name: str, step: int, rows: slice) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if model_name == "mlp":
        x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=DTYPE)[rows]
        return (model(x) - 1).square().mean()
    ids = torch.randint(1, 120, (GLOBAL_BATCH, LENGTH), generator=g)[rows]
    return model(input_ids=ids, labels=ids).loss


def state_bytes(opt) -> int:
    """Bytes of per-entry optimizer state this rank holds (the local shards of DTensors; the scalar
    step counters, replicated, are left out)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def main() -> None:
    out, method, model_name, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, groups, opt = build(method, model_name)
    first = 0
    if resume:
        import torch.distributed.checkpoint as dcp

        opt.init_state()  # a checkpoint loads into existing entries
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(state, checkpoint_id=resume)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        first = steps // 2
    os.makedirs(out, exist_ok=True)
    share = GLOBAL_BATCH // world
    for step in range(first, steps):
        loss(model, model_name, step, slice(rank * share, (rank + 1) * share)).backward()
        opt.step()
        opt.zero_grad()
        if step + 1 == steps // 2 and not resume:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=os.path.join(out, "ckpt"))
    zero = opt.zero_groups()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    sharded = [type(v).__name__ for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
               and v.dim() > 0]
    if rank == 0:
        torch.save(full, os.path.join(out, "params.pt"))
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump({"world_size": world, "zero_groups": zero.nonzero().flatten().tolist(),
                   "prunable_zero": int(opt.prunable_zero_groups().sum()),
                   "target": opt.target_num_zero_groups, "state_bytes": state_bytes(opt),
                   "state_types": sorted(set(sharded))}, f)


if __name__ == "__main__":
    main()
    leave_process_group()  # everything is on disk; a gloo abort at exit says nothing about the test
