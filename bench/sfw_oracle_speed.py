"""Cost of the K-support nuclear-norm oracle on a 768x3072 matrix, relative to a dense AdamW step.

The matrix is BERT-base's FFN size. Times (medians of interleaved rounds after warm-up; by default
the CPU time of one thread, which other jobs on a shared machine barely disturb):

* ``AdamW step``: ``torch.optim.AdamW`` on one 768x3072 parameter with a gradient, default
  implementation (on CPU: the per-tensor loop), and ``fused=True`` for reference;
* ``LMO warm``: what SFW runs every step: one warm-started block power iteration on K + 8
  columns, QR, a small eigen-decomposition and the rank-K output;
* ``LMO cold``: the first call (8 iterations from a random sketch), once per layer;
* ``SFW step``: the oracle plus momentum, step-size rescaling and the update.

The target: warm LMO < 5x the (default) AdamW step. On a dedicated machine, ``--threads 2
--clock wall`` measures what a user waits for; on a busy one wall time swings with other jobs.

    python bench/sfw_oracle_speed.py [--k 0.1 0.3] [--repeats 20] [--threads N --clock wall]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto.optim.sfw import SFW, lmo_k_support_nuclear  # noqa: E402

ROWS, COLS = 768, 3072


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


CLOCK = time.perf_counter


def clock(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=float, nargs="*", default=[0.1, 0.3], help="rank fractions K / 768")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                        help="cpu: process CPU time, steadier than wall time on a busy machine")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{ROWS}x{COLS}, {args.threads} threads, {args.clock} time; medians of {args.repeats} interleaved runs "
          "(each ratio is the median of per-round ratios, so machine load cancels out)")
    header = (f"{'K':>5} {'AdamW ms':>9} {'fused ms':>9} {'LMO warm ms':>12} {'LMO/AdamW':>10} {'LMO/fused':>10} "
              f"{'SFW step ms':>12} {'step/AdamW':>11} {'LMO cold ms':>12}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for frac in args.k:
        k = max(1, int(round(frac * ROWS)))
        adam_p = torch.nn.Parameter(torch.randn(ROWS, COLS) * 0.02)
        adam_p.grad = torch.randn_like(adam_p) * 1e-3
        adam = torch.optim.AdamW([adam_p], lr=1e-3)
        fused_p = torch.nn.Parameter(adam_p.detach().clone())
        fused_p.grad = adam_p.grad.clone()
        fused = torch.optim.AdamW([fused_p], lr=1e-3, fused=True)
        m = torch.randn(ROWS, COLS) * 1e-3
        drift = torch.randn(ROWS, COLS) * 1e-4             # a slowly moving momentum, as in training
        state = {"sketch": lmo_k_support_nuclear(m, k, 1.0, generator=torch.Generator().manual_seed(0))[1]}

        def warm():
            m.add_(drift)
            state["sketch"] = lmo_k_support_nuclear(m, k, 1.0, state["sketch"], iterations=1)[1]

        p = torch.nn.Parameter(torch.randn(ROWS, COLS) * 0.02)
        sfw = SFW([p], lr=0.1, constraint="k_support_nuclear", k=k)
        p.grad = torch.randn_like(p) * 1e-3
        sfw.step()                                          # cold start and feasibility check

        def sfw_step():
            p.grad.add_(drift)
            sfw.step()

        for fn in (adam.step, fused.step, warm, sfw_step):  # warm-up
            fn()
        rounds = [(clock(adam.step), clock(fused.step), clock(warm), clock(sfw_step)) for _ in range(args.repeats)]
        a, f, w, s_ = (list(x) for x in zip(*rounds))
        cold = [clock(lambda: lmo_k_support_nuclear(m, k, 1.0, generator=torch.Generator().manual_seed(0)))
                for _ in range(3)]
        ratio = statistics.median(wi / ai for wi, ai in zip(w, a))
        ratio_fused = statistics.median(wi / fi for wi, fi in zip(w, f))
        ratio_step = statistics.median(si / ai for si, ai in zip(s_, a))
        worst = max(worst, ratio)
        print(f"{k:>5} {median_ms(a):>9.2f} {median_ms(f):>9.2f} {median_ms(w):>12.2f} {ratio:>10.2f} "
              f"{ratio_fused:>10.2f} {median_ms(s_):>12.2f} {ratio_step:>11.2f} {median_ms(cold):>12.2f}")
    print(f"\nlow-rank oracle / dense AdamW step (default AdamW): worst {worst:.2f}x (target < 5x) -> "
          f"{'PASS' if worst < 5 else 'FAIL'}")


if __name__ == "__main__":
    main()
