"""Zero-invariant groups and exact compression across the model zoo.

For every zoo model: find the groups, zero a random 45% of the prunable ones, compress, compare
outputs with the sparse model, save and reload. Then time the analysis and ``compress`` on a
BERT-base-size model (12 layers, hidden 768), whose targets are < 10 s and < 2 s on 2 CPU cores,
and the analysis of a LLaMA-7B-shaped model built on the meta device (no weights in memory).
The analysis times include the meta-device dry run of compress (``GroupConfig.dry_run``), shown
apart in the last column.

    python bench/zoo.py            # whole table
    python bench/zoo.py --skip-base
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hf_oto  # noqa: E402
from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.compress.core import _run  # noqa: E402
from hf_oto.measure import num_parameters  # noqa: E402
from hf_oto.testing.zoo import TRANSFORMERS_ZOO, ZOO, build  # noqa: E402


def zero_fraction(model, groups, fraction: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = groups.prunable_mask & (torch.rand(len(groups), generator=gen) < fraction)
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    return mask


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.is_floating_point())


def measure(name: str, model: torch.nn.Module, inputs=None) -> tuple[dict, torch.nn.Module, list[torch.Tensor]]:
    """Time the analysis and ``compress`` with 45% of the groups zeroed; the row, the small model
    and its outputs. ``inputs=None`` lets ``find_groups`` make them."""
    start = time.perf_counter()
    groups = find_groups(model, inputs)
    analysis = time.perf_counter() - start
    zero_fraction(model, groups, 0.45)
    start = time.perf_counter()
    small = compress(model, groups).eval()
    compress_s = time.perf_counter() - start
    inputs = groups.example_inputs if inputs is None else inputs
    reference, result = _run(model, inputs), _run(small, inputs)
    found = ", ".join(f"{k} {v['prunable']}/{v['total']}" for k, v in sorted(groups.counts().items()))
    row = {"model": name, "groups": found, "analysis_s": analysis, "dry_run_s": groups.dry_run_seconds,
           "compress_s": compress_s,
           "params": f"{num_parameters(model)} -> {num_parameters(small)}",
           "max_abs_diff": max_abs_diff(reference, result), "reload": "-"}
    return row, small, result


def zoo_row(name: str) -> dict:
    model, inputs = build(name)
    row, small, result = measure(name, model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        hf_oto.save_pretrained(small, tmp)
        fresh = None if name in TRANSFORMERS_ZOO else build(name)[0]
        again = hf_oto.from_pretrained(tmp, model=fresh) if fresh is not None else hf_oto.from_pretrained(tmp)
        row["reload"] = "ok" if max_abs_diff(result, _run(again, inputs)) == 0.0 else "FAILED"
    return row


def bert_base_row() -> dict:
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    return measure("bert-base (12x768)", BertForQuestionAnswering(BertConfig()).eval())[0]


def llama_7b_row() -> dict:
    """The analysis of a LLaMA-7B-shaped model on the meta device (compress needs real weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())
    inputs = {"input_ids": torch.zeros(1, 13, dtype=torch.long, device="meta")}
    start = time.perf_counter()
    groups = find_groups(model, inputs)
    analysis = time.perf_counter() - start
    found = ", ".join(f"{k} {v['prunable']}/{v['total']}" for k, v in sorted(groups.counts().items()))
    return {"model": "llama-7b (meta)", "groups": found, "analysis_s": analysis, "dry_run_s": groups.dry_run_seconds,
            "compress_s": float("nan"), "params": f"{num_parameters(model)} -> -", "max_abs_diff": float("nan"),
            "reload": "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-base", action="store_true", help="skip the BERT-base timing row")
    parser.add_argument("--models", nargs="*", default=list(ZOO), help="zoo models to run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    rows = [zoo_row(n) for n in args.models]
    if not args.skip_base:
        rows.append(bert_base_row())
        rows.append(llama_7b_row())
    header = (f"{'model':<20} {'analysis s':>10} {'compress s':>10} {'params before -> after':>24} {'max |diff|':>10} "
              f"{'reload':>6} {'dry run s':>9}  groups (prunable/total)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<20} {r['analysis_s']:>10.3f} {r['compress_s']:>10.3f} {r['params']:>24} "
              f"{r['max_abs_diff']:>10.2e} {r['reload']:>6} {r['dry_run_s']:>9.3f}  {r['groups']}")
    if not args.skip_base:
        base, llama = rows[-2], rows[-1]
        print(f"\nBERT-base: analysis {base['analysis_s']:.2f} s (target < 10 s; dry run {base['dry_run_s']:.2f} s), "
              f"compress {base['compress_s']:.2f} s (target < 2 s, includes the exactness check)")
        print(f"LLaMA-7B on the meta device: analysis {llama['analysis_s']:.2f} s "
              f"(dry run {llama['dry_run_s']:.2f} s)")


if __name__ == "__main__":
    main()
