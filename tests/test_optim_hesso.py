"""HESSO's schedule inside a period and the reading of its cosine criterion."""

import pytest
import torch
from torch import nn

from hf_oto.groups import GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups
from hf_oto.optim import HESSO
from hf_oto.optim.hesso import importance_scores


def _model(values, num_groups: int, size: int):
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    n = num_groups * size
    groups = ZeroInvariantGroups(
        [ZeroInvariantGroup(i, "neuron", "", True, "", size) for i in range(num_groups)],
        [GroupSlice("w", True, 0, torch.arange(n), torch.arange(n) // size)], {"w": (n,)}, {})
    return model, groups


def test_a_period_of_L_steps_brings_its_groups_to_zero_in_L_minus_1():
    """As the authors' HESSO (its counter starts at 1 inside a period): with no loss gradient a
    redundant group keeps (L-2)/(L-1), (L-3)/(L-1), ... of its size and is zero and frozen after
    step L-2; the period's last step leaves it there."""
    model, groups = _model([3.0, 4.0, 10.0, 10.0, 20.0, 20.0], num_groups=3, size=2)
    opt = HESSO(model, groups, variant="sgd", lr=0.1, target_group_sparsity=0.34, start_pruning_step=1,
                pruning_steps=4, pruning_periods=1, importance_criteria={"magnitude": 1.0})
    sizes = []
    for _ in range(6):
        model.w.grad = torch.zeros_like(model.w)
        opt.step()
        sizes.append((float(model.w.detach()[:2].norm()), bool(opt.zero_groups()[0]), int(opt._oto["committed"].sum())))
    assert [s for s, _, _ in sizes] == pytest.approx([5.0, 5 * 2 / 3, 5 / 3, 0.0, 0.0, 0.0], rel=1e-6)
    assert [z for _, z, _ in sizes] == [False, False, False, True, True, True]
    assert sizes[3][2] == 1 and opt.phase() == "finished"
    # One-step and two-step periods zero their groups at once.
    for length in (1, 2):
        model, groups = _model([3.0, 4.0, 10.0, 10.0, 20.0, 20.0], num_groups=3, size=2)
        opt = HESSO(model, groups, variant="sgd", lr=0.1, target_group_sparsity=0.34, pruning_steps=length,
                    pruning_periods=1, importance_criteria={"magnitude": 1.0})
        model.w.grad = torch.zeros_like(model.w)
        opt.step()
        assert bool(opt.zero_groups()[0]) and float(model.w.detach()[2:].norm()) > 0


def test_cosine_criterion_calls_a_group_the_loss_shrinks_redundant():
    """Two groups equal in magnitude, average magnitude and |<x, d>|: the step shrinks group 0
    (<x, d> > 0, so -lr*d points toward the origin) and grows group 1. The first-order reading
    (ours) removes group 0; the authors' HESSO (importance cos + 1) would remove group 1."""
    model, groups = _model([1.0, 1.0, 1.0, 1.0, 5.0, 5.0], num_groups=3, size=2)
    grad = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.3], dtype=torch.float64)
    s = {"xx": torch.tensor([2.0, 2.0, 50.0]), "xd": torch.tensor([1.0, -1.0, 1.5]),
         "dd": torch.tensor([1.0, 1.0, 0.09])}
    candidates = torch.tensor([True, True, False])
    for name, weight in (("cosine_similarity", 1.0), ("magnitude", 1.0), ("taylor_first_order", 1.0)):
        scores = importance_scores({name: weight}, s, groups.group_sizes, candidates)
        if name == "cosine_similarity":
            assert scores[0] < scores[1]
        else:
            assert scores[0] == scores[1]
    opt = HESSO(model, groups, variant="sgd", lr=0.01, target_group_sparsity=0.34, pruning_steps=1, pruning_periods=1)
    model.w.grad = grad
    opt.step()
    assert opt.zero_groups().tolist() == [True, False, False]
