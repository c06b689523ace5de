"""DSP against channel pruning at the same FLOPs: accuracy on a small synthetic task and CPU latency.

A VGG-style CNN is trained on a generated 10-class image task (oriented colour gratings in noise),
then pruned two ways from the same dense weights with the same schedule:

* DSP: learning phase (group-lasso penalty, annealed assignments), hardening to the FLOPs
  target at 60% of the steps, fine-tuning with the pruned blocks at zero; converted to grouped layers.
* Channel pruning: the same number of plain training steps, then the same fraction q of every
  conv's filters removed, smallest L2 norms first, with ``hf_oto.compress(model, groups,
  remove=...)`` (q bisected to the FLOPs DSP reached), and the compressed model fine-tuned for the
  remaining steps.
* Ablations: DSP with penalty 0 (random groups, block magnitude pruning, same schedule) and DSP
  with the authors' global allocation rule (``allocation="global"``).

Latencies are medians of interleaved rounds in one process (the ratios are what to read: the
machine is shared). ``dsp split`` runs one dense kernel per group; ``dsp grouped`` one grouped
kernel with padding; ``dsp split, no fold`` keeps an output index in every layer, which prices
the explicit permutation.

    python bench/dsp.py               # about 2-4 minutes on 2 CPU cores
    python bench/dsp.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.compress.core import _run, max_relative_difference  # noqa: E402
from hf_oto.measure import count_flops, measure_latency  # noqa: E402
from hf_oto.methods.base import TrainingSettings  # noqa: E402
from hf_oto.methods.dsp import DSP, convert, describe  # noqa: E402


# -- data and model ------------------------------------------------------------------------------

def make_task(n: int, size: int, classes: int = 40, seed: int = 0, noise: float = 0.6, distractor: float = 1.0):
    """Oriented colour gratings: each class has its own orientation, frequency and colour; every
    image adds a random distractor grating of the same strength and noise. Phases, small
    orientation/frequency jitter and the distractor are random, so telling 40 classes apart takes
    some capacity (a 0.375x-width network loses a few points)."""
    gen = torch.Generator().manual_seed(1234)  # the class definitions are fixed
    angle = torch.rand(classes, generator=gen) * math.pi
    freq = 1.5 + torch.rand(classes, generator=gen) * 3.0
    colour = torch.randn(classes, 3, generator=gen)
    colour = colour / colour.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def grating(a: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        phase = torch.rand(n, generator=gen) * 2 * math.pi
        arg = xx * torch.cos(a)[:, None, None] + yy * torch.sin(a)[:, None, None]
        wave = torch.sin(2 * math.pi * f[:, None, None] * arg + phase[:, None, None])
        return c[:, :, None, None] * wave[:, None]

    images = grating(angle[labels] + 0.1 * torch.randn(n, generator=gen),
                     freq[labels] * (1 + 0.05 * torch.randn(n, generator=gen)), colour[labels])
    other = torch.randn(n, 3, generator=gen)
    images = images + distractor * grating(torch.rand(n, generator=gen) * math.pi,
                                           1.5 + torch.rand(n, generator=gen) * 3.0,
                                           other / other.norm(dim=1, keepdim=True))
    return images + noise * torch.randn(n, 3, size, size, generator=gen), labels


class SmallVGG(nn.Module):
    def __init__(self, widths=(32, 64, 128, 128), classes: int = 40) -> None:
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i in (1, 2):
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def accuracy(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model, data, steps, optimizer, method=None, start=1, batch=64, seed=0, after_step=None):
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(start, start + steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if method is not None:
            reg = method.regularizer(model)
            if reg is not None:
                loss = loss + reg
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if method is not None:
            method.on_step_end(model, step)
        if after_step is not None:
            after_step()
    model.eval()


# -- latency -------------------------------------------------------------------------------------

def latencies(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per forward, models interleaved round by round so load changes hit all alike."""
    return dict(zip(models, measure_latency(*models.values(), inputs=x, repeats=rounds, number=reps)))


# -- the comparison ------------------------------------------------------------------------------

def uniform_channel_mask(model: nn.Module, groups, fraction: float) -> torch.Tensor:
    """Remove the same fraction of every conv's output channels, smallest filter norms first
    (uniform L2-norm filter pruning). A global ranking (``compress(ratio=...)``) collapses the
    RGB stem, whose filters are small, and is no fair baseline."""
    norms = groups.norms(groups.parameters(model))
    remove = torch.zeros(len(groups), dtype=torch.bool)
    for s in groups.slices:
        if s.dim != 0 or not s.is_param or len(groups.tensor_shapes[s.tensor]) != 4:
            continue  # one entry per conv: its weight's output dimension
        ids = s.group[groups.prunable_mask[s.group]].unique()
        count = int(fraction * len(ids))
        if count:
            remove[ids[torch.argsort(norms[ids], stable=True)[:count]]] = True
    return remove


def run_dsp(dense, train_set, example, args, penalty: float, allocation: str):
    model = copy.deepcopy(dense)
    groups = find_groups(model, example)
    method = DSP(max_groups=args.groups, flops_reduction=args.target, penalty=penalty, allocation=allocation)
    method.prepare(model, groups)
    opt = method.create_optimizer(model, groups, TrainingSettings(learning_rate=1e-3, total_steps=args.steps))
    train(model, train_set, args.steps, opt, method=method, seed=1)
    return model, groups, method, method.finalize(model, groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="training image size")
    parser.add_argument("--dense-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=400, help="steps of the pruning run (both methods)")
    parser.add_argument("--target", type=float, default=0.7, help="FLOPs reduction")
    parser.add_argument("--groups", type=int, default=4, help="DSP max_groups")
    parser.add_argument("--penalty", type=float, default=3e-3)
    parser.add_argument("--allocation", default="layer", help="DSP allocation (see DSPConfig)")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip DSP without the penalty and DSP with the authors' global allocation")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one is steadiest on a shared machine)")
    parser.add_argument("--latency-sizes", type=int, nargs="*", default=[16, 64], help="image sizes timed")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32], help="batch sizes timed")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, small timing")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.dense_steps, args.steps, args.rounds, args.latency_sizes, args.batches = 20, 20, 3, [16], [8]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    train_set = make_task(4000, args.size, seed=0)
    test_set = make_task(2000, args.size, seed=1)
    example = (test_set[0][:4],)
    dense = SmallVGG()
    train(dense, train_set, args.dense_steps, torch.optim.AdamW(dense.parameters(), lr=2e-3), seed=0)
    dense_flops = count_flops(dense, example[0])
    rows = {"dense": (dense, dense_flops)}
    learn = int(round(0.6 * args.steps))

    dsp_model, groups, method, dsp_split = run_dsp(dense, train_set, example, args, args.penalty, args.allocation)
    exact = max_relative_difference(_run(dsp_model, test_set[0][:64]), _run(dsp_split, test_set[0][:64]))
    dsp_grouped = convert(dsp_model, method.assignments, groups=groups, mode="grouped")
    dsp_nofold = convert(dsp_model, method.assignments, groups=groups, mode="split", fold=False)
    dsp_flops = count_flops(dsp_split, example[0])
    rows["dsp"] = (dsp_split, dsp_flops)
    if not args.no_ablation:
        *_, plain = run_dsp(dense, train_set, example, args, 0.0, args.allocation)
        rows["dsp, penalty 0"] = (plain, count_flops(plain, example[0]))
        if args.allocation != "global":
            *_, authors = run_dsp(dense, train_set, example, args, args.penalty, "global")
            rows["dsp, global alloc."] = (authors, count_flops(authors, example[0]))

    # Channel pruning to the same FLOPs, same schedule.
    chan = copy.deepcopy(dense)
    chan_groups = find_groups(chan, example)
    opt = torch.optim.AdamW(chan.parameters(), lr=1e-3)
    train(chan, train_set, learn, opt, seed=1)
    lo, hi = 0.0, 0.99
    for _ in range(20):
        mid = (lo + hi) / 2
        small_flops = count_flops(compress(chan, chan_groups, remove=uniform_channel_mask(chan, chan_groups, mid)),
                                  example[0])
        lo, hi = (lo, mid) if small_flops <= dsp_flops else (mid, hi)
    chan_small = compress(chan, chan_groups, remove=uniform_channel_mask(chan, chan_groups, hi))
    opt = torch.optim.AdamW(chan_small.parameters(), lr=1e-3)
    train(chan_small, train_set, args.steps - learn, opt, start=learn + 1, seed=2)
    rows["channel pruning"] = (chan_small, count_flops(chan_small, example[0]))
    train_seconds = time.perf_counter() - started

    models = {"dense": dense, "channel": chan_small, "dsp split": dsp_split, "dsp grouped": dsp_grouped,
              "dsp split, no fold": dsp_nofold}
    timing = {}
    for size in args.latency_sizes:
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            timing[f"{size}px x{batch}"] = latencies(models, x, args.rounds, reps=max(1, 64 // batch))

    print(describe(method))
    print()
    print(f"task: 40 classes, {args.size}px, 4000 train / 2000 test; dense {args.dense_steps} steps, pruning runs "
          f"{args.steps} steps (pruned at step {learn}, then fine-tuned); {train_seconds:.0f} s")
    print(f"{'model':<20} {'FLOPs':>10} {'reduction':>9} {'accuracy':>8}")
    results = {}
    for name, (model, f) in rows.items():
        acc = accuracy(model, test_set)
        results[name] = {"flops": f, "reduction": 1 - f / dense_flops, "accuracy": acc}
        print(f"{name:<20} {f:>10} {1 - f / dense_flops:>9.1%} {acc:>8.1%}")
    print(f"DSP converted vs trained: max difference {exact:.1e} of the output scale")
    print()
    print(f"CPU latency, {args.threads} thread(s), median of {args.rounds} interleaved rounds (ms per forward):")
    names = list(models)
    print(f"{'input':<12}" + "".join(f"{n:>19}" for n in names) + f"{'split/channel':>15}{'grouped/channel':>17}"
          f"{'no-fold/split':>15}")
    for key, t in timing.items():
        print(f"{key:<12}" + "".join(f"{1e3 * t[n]:>19.3f}" for n in names)
              + f"{t['dsp split'] / t['channel']:>15.2f}{t['dsp grouped'] / t['channel']:>17.2f}"
              + f"{t['dsp split, no fold'] / t['dsp split']:>15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "exact": exact, "latency": timing, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
