"""Time one optimizer step of HESSO / DHSPG / HSPG against torch.optim on a BERT-base parameter set.

The model is BertForQuestionAnswering with the BERT-base config (12 layers, hidden 768, 110M
parameters, random weights); gradients are fixed random tensors, so only ``optimizer.step()`` is
timed. Every row is measured against its reference (``torch.optim.AdamW(foreach=True)`` for
adamw rows, ``torch.optim.SGD(momentum=0.9, foreach=True)`` and AdamW for sgd rows) in the same
run, the steps alternating ``--repeat`` times; each keeps its minimum CPU time (the least disturbed
by other processes on a shared machine); the minimum wall time is printed too.

Phases:
  warm-up         before the pruning window (plain base step)
  warm-up+scores  a warm-up step just before the window: also accumulates the loss-based saliency
                  (one dot product per group from the raw gradients), as every step within
                  ``saliency_steps`` of a selection does
  period start    HESSO/DHSPG first step of a period: scores + selection (once per period);
                  "(flops)": the selection weighs groups by FLOPs toward target_kept_flops=0.5
  pruning+scores  a pruning step that also accumulates the saliency
  pruning         inside the window (HESSO: shrink of the redundant groups; DHSPG: adaptive
                  lambdas, penalty and half-space test; HSPG: its half-space stage)
  prox            HSPG's proximal stage (group soft-thresholding after every step)
  finished        after the window, half of the groups frozen (their gradients are masked)

Targets: at most 1.3x AdamW's step in the pruning phase (and HSPG's proximal stage), at most 1.1x
outside it. Sgd rows print their ratio to SGD and to AdamW (all three interleaved); "ok" means both
are within the target, "ok/AdamW" only the one to AdamW.
Memory: "extra" is the peak of the temporaries a step allocates, per parameter byte, tracked
op by op with a dispatch mode (CPU has no allocator statistics); "state" is the optimizer's
persistent state per parameter byte.

    python bench/optim_step.py              # BERT-base, 5 timed steps per row
    python bench/optim_step.py --quick      # a 2-layer model, to check that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.peak_memory import PeakTemporaries  # noqa: E402
from hf_oto import find_groups  # noqa: E402
from hf_oto.optim import create_oto_optimizer  # noqa: E402


def _tensors(opt) -> list[torch.Tensor]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
            out += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def _state_bytes(opt) -> int:
    total = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    index = getattr(opt, "_index", None)
    if index is not None:  # hf_oto: the group index tensors and cached positions
        total += sum(t.nbytes for s in index.slices for t in (s.index, s.group, s.sorted_index, s.segment_groups,
                                                             s.segment_lengths))
        total += sum(t.nbytes for _, where in opt._positions_cache.values() for sl in where.slices for t in sl[2:4])
    return total


def _time_interleaved(opts: list, repeat: int) -> list[tuple[float, float]]:
    """Alternate the ``step()`` of every optimizer in ``opts``, ``repeat`` rounds.

    Returns per optimizer the minimum (CPU seconds, wall seconds). Interleaving makes all of them
    see the same background load; CPU time (``time.process_time``: this process, all threads) is
    what the verdicts use, as wall time on a shared machine mostly measures the other processes.
    """
    times: list[list[tuple[float, float]]] = [[] for _ in opts]
    for _ in range(repeat):
        for o, out in zip(opts, times):
            cpu, wall = time.process_time(), time.perf_counter()
            o.step()
            out.append((time.process_time() - cpu, time.perf_counter() - wall))
    return [(min(c for c, _ in t), min(w for _, w in t)) for t in times]


def _peak_extra(opt) -> int:
    existing = {t.untyped_storage().data_ptr() for t in _tensors(opt)}
    with PeakTemporaries(existing) as mode:
        opt.step()
    return mode.peak


def build(quick: bool):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2) if quick else BertConfig()
    model = BertForQuestionAnswering(cfg)
    groups = find_groups(model)
    fresh_grads(model)
    return model, groups


def fresh_grads(model) -> None:
    """Dense random gradients. Set again before every row: an optimizer masks the gradient entries
    of its frozen groups in place, and the next row must not start from those zeros (Adam moments
    that stay exactly zero make CPU ``sqrt`` several times slower, which would charge one row for
    another's pruning)."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


def rows_to_run(variants: list[str]) -> list[tuple[str, str, str, dict]]:
    """(method, variant, phase, settings) for every row; settings place the step in its phase."""
    far = 10**6
    rows = []
    for variant in variants:
        rows += [
            ("hesso", variant, "warm-up", dict(start_pruning_step=far, pruning_steps=10)),
            # the warm-up steps just before the window: the loss-based scores accumulate
            ("hesso", variant, "warm-up+scores", dict(start_pruning_step=far, pruning_steps=10, saliency_steps=far)),
            # one-step periods: every step scores, selects (and projects) its share of the groups
            ("hesso", variant, "period start", dict(start_pruning_step=0, pruning_steps=1000, pruning_periods=1000)),
            ("hesso", variant, "period start (flops)", dict(start_pruning_step=0, pruning_steps=1000,
                                                            pruning_periods=1000, target_kept_flops=0.5)),
            ("hesso", variant, "pruning", dict(start_pruning_step=0, pruning_steps=far, pruning_periods=10,
                                               _skip=1)),
            ("hesso", variant, "pruning+scores", dict(start_pruning_step=0, pruning_steps=far, pruning_periods=10,
                                                      saliency_steps=far, _skip=1)),
            ("hesso", variant, "finished", dict(start_pruning_step=0, pruning_steps=2, pruning_periods=1, _skip=2)),
            ("dhspg", variant, "pruning", dict(start_pruning_step=0, pruning_steps=far, _skip=1)),
            ("dhspg", variant, "finished", dict(start_pruning_step=0, pruning_steps=2, _skip=2)),
            ("hspg", variant, "prox", dict(start_pruning_step=far)),
            ("hspg", variant, "pruning", dict(start_pruning_step=0, _skip=1)),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer BERT instead of BERT-base")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per row (the minimum is kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: no barrier stalls when other processes share the cores)")
    parser.add_argument("--variants", nargs="*", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model, groups = build(args.quick)
    params = list(model.parameters())
    param_bytes = sum(p.nbytes for p in params)
    print(f"model: BertForQuestionAnswering {'2 layers' if args.quick else 'BERT-base'}, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters, {groups.num_prunable} prunable groups, "
          f"{torch.get_num_threads()} thread(s), min of {args.repeat} interleaved steps, CPU time\n")

    refs = {"adamw": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True),
            "sgd": torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=0.01, foreach=True)}
    ref_mem = {}
    for variant, ref in refs.items():
        ref.step()  # allocate the state (the AdamW reference also times the sgd rows)
        ref_mem[variant] = (_peak_extra(ref) / param_bytes, _state_bytes(ref) / param_bytes)

    header = (f"{'method':<7} {'variant':<7} {'phase':<20} {'step ms':>8} {'ref ms':>8} {'ratio':>6} {'AdamW ms':>8} "
              f"{'/AdamW':>6} {'target':>10} {'wall ms':>8} {'extra B/B':>9} {'ref extra':>9} {'state B/B':>9} "
              f"{'ref state':>9}")
    print(header)
    print("-" * len(header), flush=True)
    for method, variant, phase, settings in rows_to_run(args.variants):
        fresh_grads(model)
        settings = dict(settings)
        skip = settings.pop("_skip", 0)
        kw = dict(lr=1e-5, weight_decay=0.01)
        if variant == "sgd":
            kw["momentum"] = 0.9
        if method == "hspg":
            kw["lmbda"] = 1e-3
        elif "target_kept_flops" not in settings:
            kw["target_group_sparsity"] = 0.5
        opt = create_oto_optimizer(model, groups, method=method, variant=variant, **kw, **settings)
        opt.step()  # allocate the state (and, where _skip says so, move into the phase)
        for _ in range(skip - 1):
            opt.step()
        if variant == "adamw":
            (seconds, wall), (ref_s, _) = _time_interleaved([opt, refs["adamw"]], args.repeat)
            adamw_s = ref_s
        else:
            (seconds, wall), (ref_s, _), (adamw_s, _) = _time_interleaved([opt, refs["sgd"], refs["adamw"]],
                                                                           args.repeat)
        kind = phase.split("+")[0].split(" (")[0]
        expected = "pruning" if kind in ("pruning", "period start") else ("warmup" if kind in ("warm-up", "prox")
                                                                          else "finished")
        assert opt.phase() == expected, (method, phase, opt.phase())
        extra = _peak_extra(opt) / param_bytes
        state = _state_bytes(opt) / param_bytes
        ref_extra, ref_state = ref_mem[variant]
        ratio = seconds / ref_s
        # Steps that accumulate the loss-based scores belong to the pruning (they precede a selection).
        target = 1.3 if kind in ("pruning", "prox") or "+scores" in phase else (
            None if kind == "period start" else 1.1)
        # The targets are stated against AdamW's step; sgd rows are also checked against SGD's.
        verdict = "-" if target is None else (f"<={target} " + ("ok" if max(ratio, seconds / adamw_s) <= target
                                                                   else ("ok/AdamW" if seconds / adamw_s <= target
                                                                         else "MISS")))
        print(f"{method:<7} {variant:<7} {phase:<20} {seconds * 1e3:>8.1f} {ref_s * 1e3:>8.1f} {ratio:>6.2f} "
              f"{adamw_s * 1e3:>8.1f} {seconds / adamw_s:>6.2f} {verdict:>10} {wall * 1e3:>8.1f} {extra:>9.3f} "
              f"{ref_extra:>9.3f} "
              f"{state:>9.3f} {ref_state:>9.3f}", flush=True)
        del opt


if __name__ == "__main__":
    main()
