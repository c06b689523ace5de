"""Optimizer memory per parameter byte: HESSO / DHSPG against torch.optim.AdamW, one process and 2 FSDP2 ranks.

The model is a small Llama-shaped decoder (grouped-query attention, gated FFN; random weights)
built from a config; every optimizer trains a fresh copy with the same batches through a whole
schedule (2 warm-up steps, a 4-step pruning window in 2 periods, 2 steps after it). Per rank:

- ``state``: the optimizer's persistent per-parameter state (Adam moments; the local shards of
  DTensors under FSDP2), scalar step counters left out;
- ``index``: hf_oto's group index (positions of every prunable group, mapped to the rank's rows,
  and the cached positions of the frozen/active groups): memory AdamW does not have;
- ``temporaries``: the peak of the tensors ``optimizer.step()`` allocates and frees (tracked op by
  op with a dispatch mode, as ``bench/optim_step.py`` does: CPU has no allocator statistics),
  the maximum over all steps of the schedule;
- ``step peak``: parameters + gradients + state + index + temporaries held by the rank during
  its largest step.

Each figure is divided by the bytes of the *whole* model's parameters, so a rank holding half of
everything shows about half of the one-process number. AdamW is ``torch.optim.AdamW(foreach=True)``
on the same (sharded) parameters, as FSDP2 users run it.

    python bench/memory.py            # 1 process, then 2 FSDP2 ranks (torchrun, gloo)
    python bench/memory.py --quick    # a tiny model, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.peak_memory import PeakTemporaries  # noqa: E402
from hf_oto import find_groups  # noqa: E402
from hf_oto.optim import DHSPG, HESSO  # noqa: E402
from hf_oto.optim._sharding import local  # noqa: E402

STEPS, BATCH, LENGTH = 8, 4, 32
OPTIMIZERS = ("adamw", "hesso", "dhspg")


def build_model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(vocab_size=2048, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _local_tensors(opt) -> list[torch.Tensor]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(local(p))
            if p.grad is not None:
                out.append(local(p.grad))
            out += [local(v) for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(opt) -> int:
    return _bytes(local(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())


def _index_bytes(opt) -> int:
    index = getattr(opt, "_index", None)
    if index is None:
        return 0
    total = _bytes(t for s in index.slices for t in (s.index, s.group, s.sorted_index, s.segment_groups,
                                                     s.segment_lengths))
    return total + _bytes(t for _, where in opt._positions_cache.values() for sl in where.slices for t in sl[2:4])


def run(name: str, quick: bool, groups, world: int, rank: int) -> dict[str, float]:
    model = build_model(quick)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    else:
        cls = {"hesso": HESSO, "dhspg": DHSPG}[name]
        opt = cls(model, groups, variant="adamw", lr=1e-3, weight_decay=0.01, target_group_sparsity=0.5,
                  start_pruning_step=2, pruning_steps=4, pruning_periods=2)
    params = _bytes(local(p) for p in model.parameters())
    share = BATCH // world
    peak_tmp, peak_step = 0, 0
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=g)[rank * share:(rank + 1) * share]
        model(input_ids=ids, labels=ids).loss.backward()
        held = _local_tensors(opt)
        before = params + _bytes(local(p.grad) for p in model.parameters() if p.grad is not None) \
            + _state_bytes(opt) + _index_bytes(opt)
        with PeakTemporaries({t.untyped_storage().data_ptr() for t in held}) as mode:
            opt.step()
        # State created by the first step counts as state, not as a temporary.
        created = _state_bytes(opt) + _index_bytes(opt) - (before - params - _bytes(
            local(p.grad) for p in model.parameters() if p.grad is not None))
        peak_tmp = max(peak_tmp, mode.peak - max(created, 0))
        peak_step = max(peak_step, before + mode.peak)
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as between steps of a real run
    return {"params": params, "state": _state_bytes(opt), "index": _index_bytes(opt), "temporaries": peak_tmp,
            "step_peak": peak_step}


def measure(quick: bool, world: int, rank: int) -> dict[str, dict[str, float]]:
    model = build_model(quick)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    groups = find_groups(model, {"input_ids": ids})
    total = _bytes(model.parameters())
    del model
    out = {}
    for name in OPTIMIZERS:
        r = run(name, quick, groups, world, rank)
        out[name] = {k: v / total for k, v in r.items()}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # under torchrun: write this rank's numbers here
    args = parser.parse_args()
    if args.worker:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        result = measure(args.quick, world, rank)
        with open(f"{args.worker}.{rank}", "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()
        return
    torch.set_num_threads(1)
    rows = {"1 process": measure(args.quick, 1, 0)}
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "rank")
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), __file__, "--worker", target]
        if args.quick:
            cmd.append("--quick")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.load(open(f"{target}.{r}")) for r in range(2)]
    # The busier rank: what a device must hold.
    rows["2 FSDP2 ranks (max over ranks)"] = {name: {k: max(r[name][k] for r in ranks) for k in ranks[0][name]}
                                              for name in OPTIMIZERS}
    print("| setup | optimizer | params | state | index | temporaries | step peak | step peak / AdamW's |")
    print("|---|---|---|---|---|---|---|---|")
    for setup, result in rows.items():
        base = result["adamw"]["step_peak"]
        for name in OPTIMIZERS:
            r = result[name]
            print(f"| {setup} | {name} | {r['params']:.3f} | {r['state']:.3f} | {r['index']:.4f} | "
                  f"{r['temporaries']:.3f} | {r['step_peak']:.3f} | {r['step_peak'] / base:.3f} |")
    print("\nBytes per byte of the whole model's parameters (float32), on each rank.")


if __name__ == "__main__":
    main()
