"""Robustness curve: accuracy after compression without retraining, SFW versus SGD.

Trains each model once (seeded, one CPU thread each), then

* prunes it at several ratios: ``compress(model, groups, ratio=r)`` removes the r fraction of
  prunable neurons / channels with the smallest norms (one global ranking), and for the CNN also
  ``scope="layer"`` (the same fraction of every layer);
* separately truncates it to low rank: ``decompose_low_rank(model, rank_ratio=r)`` (classifier
  excluded, for both optimizers);

and prints test accuracy for each ratio. Setups (see ``hf_oto/testing/sfw_experiment.py``):

* ``mlp``: 32-d Gaussian inputs labelled by a random tanh teacher (10 classes, 16k train / 2k
  test); MLP 32-128-128-10, Kaiming init, 5 epochs of batch 64 (1280 steps), linear lr decay.
* ``cnn``: 12x12 noisy shifted class templates (10 classes, 8k / 2k); conv3x3-BN-ReLU x2,
  max-pool, conv1x1-BN-ReLU, average pool, linear; 8 epochs (1024 steps).

Baselines: SGD with momentum 0.9 and the usual weight decay 5e-4, and SGD with a 10x stronger
weight decay 5e-3 (which also pushes towards compressible weights). SFW: ``structure="prune"``
(group-K-support, K = 30% (and 10%) of each layer's groups) or ``structure="low_rank"``
(K-support nuclear, K = 30% of the rank), lr 1 (and 3), radius 2x the initial norms.

    python bench/sfw_robustness.py                 # both setups (a few minutes on 2 cores)
    python bench/sfw_robustness.py --setups mlp    # the MLP only (~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto.testing.sfw_experiment import (  # noqa: E402
    SFW_LOW_RANK,
    SFW_PRUNE,
    SGD,
    SGD_STRONG_WD,
    cnn,
    image_data,
    mlp,
    run,
    teacher_data,
)

RATIOS = [0.1, 0.3, 0.5, 0.7, 0.9]


def measure(build, data, cfg, ratios, layer_scope: bool) -> dict:
    curves = []
    if cfg.structure != "low_rank" or cfg.optimizer == "sgd":
        curves += ["prune", "prune_layer"] if layer_scope else ["prune"]
    if cfg.structure != "prune" or cfg.optimizer == "sgd":
        curves.append("low_rank")
    result = run(build, data, cfg, ratios, curves=curves)
    row = {"label": result.label, "config": result.config, "train_s": result.train_seconds, "dense": result.dense}
    row.update({key: getattr(result, key) for key in ("prune", "prune_layer", "low_rank") if key in curves})
    return row


def table(title: str, rows: list[dict], key: str, ratios) -> None:
    rows = [r for r in rows if key in r]
    if not rows:
        return
    print(f"\n{title}")
    header = f"{'training':<42} {'dense':>6} " + " ".join(f"{f'{int(r * 100)}%':>6}" for r in ratios)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['label']:<42} {r['dense']:>6.3f} " + " ".join(f"{r[key][x]:>6.3f}" for x in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="*", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    if "mlp" in args.setups:
        data = teacher_data()
        configs = (SGD, SGD_STRONG_WD, SFW_PRUNE, replace(SFW_PRUNE, k=0.1), SFW_LOW_RANK)
        rows = [measure(mlp, data, cfg, RATIOS, layer_scope=False) for cfg in configs]
        print("MLP 32-128-128-10 on teacher labels; test accuracy (chance 0.10); training seconds: "
              + ", ".join(f"{r['label']} {r['train_s']:.1f}" for r in rows))
        table("pruned neurons (compress ratio, global), no retraining", rows, "prune", RATIOS)
        table("low-rank truncation (decompose_low_rank rank_ratio; classifier kept), no retraining",
              rows, "low_rank", RATIOS)
        results["mlp"] = rows
    if "cnn" in args.setups:
        data = image_data()
        configs = [replace(c, epochs=8) for c in (SGD, SGD_STRONG_WD, SFW_PRUNE)]
        configs.append(replace(SFW_PRUNE, epochs=8, lr=3.0))
        rows = [measure(cnn, data, cfg, RATIOS, layer_scope=True) for cfg in configs]
        print("\nSmall CNN (BatchNorm) on noisy shifted templates; training seconds: "
              + ", ".join(f"{r['label']} {r['train_s']:.1f}" for r in rows))
        table("pruned channels, one global ranking (compress ratio), no retraining", rows, "prune", RATIOS)
        table("pruned channels, the same fraction of every layer, no retraining", rows, "prune_layer", RATIOS)
        results["cnn"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
