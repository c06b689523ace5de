"""Trained once with SFW, a small model survives pruning and low-rank truncation without
retraining better than the same model trained with SGD (seeded, a few seconds on CPU)."""

import pytest

from hf_oto.testing.sfw_experiment import SFW_LOW_RANK, SFW_PRUNE, SGD, mlp, run, teacher_data

RATIOS = (0.3, 0.5, 0.7)


@pytest.fixture(scope="module")
def results():
    data = teacher_data()
    return {"sgd": run(mlp, data, SGD, RATIOS),
            "sfw_prune": run(mlp, data, SFW_PRUNE, RATIOS, curves=("prune",)),
            "sfw_low_rank": run(mlp, data, SFW_LOW_RANK, RATIOS, curves=("low_rank",))}


def test_both_optimizers_learn_the_task(results):
    # 10 classes: chance is 0.1; both dense models are trained comparably well
    dense = {k: r.dense for k, r in results.items()}
    assert all(acc > 0.7 for acc in dense.values()), dense
    assert max(dense.values()) - min(dense.values()) < 0.05, dense


def test_sfw_keeps_more_accuracy_when_neurons_are_pruned(results):
    sgd, sfw = results["sgd"], results["sfw_prune"]
    for r in RATIOS:
        assert sfw.prune[r] > sgd.prune[r] + 0.01, (r, sfw.prune, sgd.prune)
        assert sfw.prune[r] >= sfw.dense - 0.02, (r, sfw.dense, sfw.prune)        # barely moves
    assert sgd.prune[0.7] < sgd.dense - 0.1                                     # SGD does suffer


def test_sfw_keeps_more_accuracy_when_truncated_to_low_rank(results):
    sgd, sfw = results["sgd"], results["sfw_low_rank"]
    for r in RATIOS:
        assert sfw.low_rank[r] > sgd.low_rank[r] + 0.005, (r, sfw.low_rank, sgd.low_rank)
        assert sfw.low_rank[r] >= sfw.dense - 0.02, (r, sfw.dense, sfw.low_rank)
