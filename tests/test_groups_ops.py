"""The vectorised group maths agree with a naive per-group computation."""

import torch

from hf_oto import ZeroInvariantGroups, find_groups
from hf_oto.testing.zoo import build
from helpers import group_element_mask


def _naive_sq_norms(groups: ZeroInvariantGroups, tensors):
    """Element masks per group, built one group at a time."""
    out = torch.zeros(len(groups))
    for g in range(len(groups)):
        for name, t in zip(groups.param_names, tensors):
            out[g] += (t[group_element_mask(groups, name, t, g)] ** 2).sum()
    return out


def test_sq_norms_dots_scale_and_zero_match_naive():
    model, inputs = build("densenet-block")  # overlapping groups (rows and columns of one conv)
    groups = find_groups(model, inputs)
    tensors = [torch.randn_like(p) for p in groups.parameters(model)]
    naive = _naive_sq_norms(groups, tensors)
    assert torch.allclose(groups.sq_norms(tensors), naive, rtol=1e-5)
    assert torch.allclose(groups.dots(tensors, tensors), naive, rtol=1e-5)

    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[::3] = True
    groups.zero_(tensors, mask)
    after = groups.sq_norms(tensors)
    assert (after[mask] == 0).all() and (after[~mask] > 0).all()

    factors = torch.full((len(groups),), 2.0)
    before = groups.sq_norms(tensors)
    groups.scale_(tensors, factors)
    scaled = groups.sq_norms(tensors)
    assert (scaled >= 4 * before * (1 - 1e-5)).all()  # overlaps are scaled by both factors


def test_group_sizes_count_each_entry_once():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    params = groups.parameters(model)
    ones = [torch.ones_like(p) for p in params]
    assert torch.equal(groups.sq_norms(ones).long(), groups.group_sizes)


def test_state_dict_round_trip(tmp_path):
    model, inputs = build("llama-gqa")
    groups = find_groups(model, inputs)
    path = tmp_path / "groups.json"
    groups.save(path)
    again = ZeroInvariantGroups.load(path)
    assert again.groups == groups.groups and again.param_names == groups.param_names
    tensors = [torch.randn_like(p) for p in groups.parameters(model)]
    assert torch.equal(again.sq_norms(tensors), groups.sq_norms(tensors))
    assert [(b.module, b.attribute) for b in again.bindings] == [(b.module, b.attribute) for b in groups.bindings]


def test_feasible_removal_never_empties_a_dimension():
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    everything = groups.prunable_mask
    kept = everything & ~groups.feasible_removal(everything)
    plan = groups.removal_plan(groups.feasible_removal(everything))
    assert kept.sum() > 0
    assert all(len(keep) > 0 for dims in plan.values() for keep in dims.values())
