"""HSPG and DHSPG as published: the subgradient trial step, the half-space test, HSPG's per-kind
upper bounds and adaptive epsilon."""

import copy

import pytest
import torch
from torch import nn

from hf_oto import find_groups
from hf_oto.groups import GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups
from hf_oto.optim import DHSPG, HSPG
from hf_oto.testing.zoo import build


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, find_groups(model, (torch.randn(2, 6),))


def _set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("variant, kw, reference", [
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("adam", dict(lr=0.02, weight_decay=0.01), lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.01)),
    ("adamw", dict(lr=0.02, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1)),
])
def test_halfspace_step_is_the_subgradient_step_and_its_test(variant, kw, reference):
    """Each non-zero group: y = x - lr*d - lr*lambda*x/||x|| (d: torch's step direction, decay
    included); projected to exactly zero iff <y, x> < epsilon ||x||^2."""
    model, groups = _mlp()
    twin = copy.deepcopy(model)
    lmbda, epsilon = 0.25 / kw["lr"], 0.3  # lr*lmbda = 0.25: some of the groups (norms ~0.6) cross
    opt = HSPG(model, groups, variant=variant, lmbda=lmbda, epsilon=epsilon, adapt_epsilon_every=0, **kw)
    ref = reference(list(twin.parameters()))
    params, twin_params = groups.parameters(model), groups.parameters(twin)
    prunable = groups.prunable_mask
    crossed_any = False
    for k in range(4):
        _set_grads(model, k)
        _set_grads(twin, k)
        x = [p.detach().clone() for p in params]
        frozen = opt.zero_groups() & prunable
        ref.step()  # z = x - lr*d on the twin (which holds x: it is reset below)
        opt.step()
        z = [p.detach().clone() for p in twin_params]
        norms = groups.norms(x)
        live = prunable & ~frozen & (norms > 0)
        # Expected: the subgradient step on live groups, from x (entries of one prunable group each).
        coef = torch.where(live, lmbda / norms.clamp_min(1e-30), torch.zeros_like(norms))
        pen = [torch.zeros_like(a) for a in x]
        for i, name in enumerate(groups.param_names):
            for s in groups.slices:
                if s.tensor != name or not s.is_param:
                    continue
                keep = prunable[s.group]
                shape = [1] * x[i].dim()
                shape[s.dim] = -1
                vec = torch.zeros(x[i].shape[s.dim])
                vec[s.index[keep]] = coef[s.group[keep]]
                pen[i] += vec.view(shape) * x[i]
        y = [a - kw["lr"] * b for a, b in zip(z, pen)]
        inner = groups.dots(y, x)
        cross = live & (inner < epsilon * norms.square())
        if bool((cross | frozen)[prunable].all()):  # no projection empties the layer: the shallowest stays
            depth = torch.where(cross, inner / norms.square(), torch.full_like(inner, -float("inf")))
            cross[torch.argmax(depth)] = False
        crossed_any |= bool(cross.any())
        assert torch.equal(opt.zero_groups() & prunable, frozen | cross)
        groups.zero_(y, cross | frozen)
        for i, (got, want) in enumerate(zip(params, y)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), groups.param_names[i]
        with torch.no_grad():  # both continue from hf_oto's point
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)
        if variant == "sgd":  # the twin's momentum must match ours (frozen groups masked)
            for p, q in zip(model.parameters(), twin.parameters()):
                ref.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
        else:
            for p, q in zip(model.parameters(), twin.parameters()):
                for key in ("exp_avg", "exp_avg_sq"):
                    ref.state[q][key] = opt.state[p][key].clone()
    assert 0 < int(opt.zero_groups().sum()) < int(prunable.sum()) and crossed_any


def _one_group(noise: float):
    """Group 0 is x = (0.01, 0), its base direction (0, noise) orthogonal to it; group 1 is larger."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([0.01, 0.0, 1.0, 1.0], dtype=torch.float64))
    groups = ZeroInvariantGroups(
        [ZeroInvariantGroup(0, "neuron", "", True, "", 2), ZeroInvariantGroup(1, "neuron", "", True, "", 2)],
        [GroupSlice("w", True, 0, torch.arange(4), torch.tensor([0, 0, 1, 1]))], {"w": (4,)}, {})
    model.w.grad = torch.tensor([0.0, noise, 0.0, 0.0], dtype=torch.float64)
    return model, groups


@pytest.mark.parametrize("cls", [HSPG, DHSPG])
def test_the_penalty_carries_a_group_across_where_a_proximal_step_would_not(cls):
    """||x|| = 0.01 < lr*lambda = 0.02, but the base step adds a component orthogonal to x of
    norm 0.1 (Adam's direction does that to a small group). The subgradient trial point's
    component along x is 0.01 - 0.02 < 0: projected. A proximal trial point, z = x - lr*d rescaled
    by max(0, 1 - lr*lambda/||z||), keeps <y, x> > 0 (||z|| = 0.1005 > lr*lambda): kept."""
    model, groups = _one_group(noise=1.0)
    x, lr, lmbda = model.w.detach()[:2].clone(), 0.1, 0.2
    z = x - lr * model.w.grad[:2]
    proximal = z * max(0.0, 1 - lr * lmbda / float(z.norm()))
    assert float(proximal @ x) > 0
    # DHSPG scores by the published redundancy mix here: with no gradient history a loss-based
    # saliency would see both groups as equal.
    kw = dict(lmbda=lmbda) if cls is HSPG else dict(lmbda=lmbda, hat_lmbda_coeff=1.0, target_group_sparsity=0.5,
                                                     pruning_steps=2, selection={"saliency": "mixed"})
    opt = cls(model, groups, variant="sgd", lr=lr, **kw)
    opt.step()
    assert opt.zero_groups().tolist() == [True, False]
    assert float((z - lr * lmbda * x / x.norm()) @ x) < 0


def test_hspg_bounds_each_kind_and_keeps_the_penalty_after_the_bound():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    kinds = [g.kind for g in groups]
    heads = torch.tensor([k == "head" for k in kinds]) & groups.prunable_mask
    neurons = torch.tensor([k == "neuron" for k in kinds]) & groups.prunable_mask
    # epsilon 0.99, lr*lmbda = 0.01: with no loss gradient every group under norm 1 crosses.
    opt = HSPG(model, groups, variant="sgd", lr=0.05, lmbda=0.2, epsilon=0.99, target_group_sparsity=0.5,
               upper_group_sparsity={"head": 0.25}, adapt_epsilon_every=0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    zero = opt.zero_groups()
    limits = (int(0.25 * int(heads.sum())), int(0.5 * int(neurons.sum())))
    assert (int((zero & heads).sum()), int((zero & neurons).sum())) == limits
    assert opt.target_num_zero_groups == sum(limits)
    assert opt.pruning_finished and opt.phase() == "pruning"
    # The bound is met, the penalty still acts: with no loss gradient every non-zero group's norm
    # drops by exactly lr * lmbda per step (a subgradient step along -x/||x||), and none is projected.
    params = groups.parameters(model)
    before = groups.norms(params)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = groups.norms(params)
    live = groups.prunable_mask & ~zero
    assert torch.equal(opt.zero_groups(), zero)
    assert torch.allclose(before[live] - after[live], torch.full((int(live.sum()),), 0.05 * 0.2), atol=1e-5)
    with pytest.raises(ValueError, match="kinds head, neuron"):
        HSPG(model, groups, upper_group_sparsity={"channel": 0.5})


def test_hspg_epsilon_adapts_per_kind_and_projects_the_smallest_groups():
    """With no loss gradient and a small lambda the half-space test only fires once epsilon is
    near 1 - lr*lambda/||x||: raised 0.1 per period of stalled sparsity, epsilon brings in the
    smallest groups first, up to the bound; a kind at its bound drops back to epsilon 0."""
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    neurons = torch.tensor([g.kind == "neuron" for g in groups]) & groups.prunable_mask
    params = groups.parameters(model)
    norms0 = groups.norms(params)
    opt = HSPG(model, groups, variant="sgd", lr=0.05, lmbda=0.05, epsilon=0.3, adapt_epsilon_every=2,
               upper_group_sparsity={"head": 0.0, "neuron": 0.25})
    seen = []
    for _ in range(24):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        m = opt.metrics()
        seen.append((m["epsilon_head"], m["epsilon_neuron"], int(opt.zero_groups()[neurons].sum())))
    assert seen[0] == (0.3, 0.3, 0) and seen[1][:2] == (0.0, pytest.approx(0.4))
    assert seen[2][:2] == seen[1][:2] and seen[3][:2] == (0.0, pytest.approx(0.5))
    limit = int(0.25 * int(neurons.sum()))
    assert seen[-1][2] == limit and seen[-1][1] == 0.0  # at the bound: back to 0
    first = next(i for i, s in enumerate(seen) if s[2] > 0)
    assert seen[first][1] > 0.6  # nothing crossed before epsilon rose
    zero = opt.zero_groups()
    assert not (zero & ~neurons).any()
    smallest = norms0.masked_fill(~neurons, float("inf")).argsort()[:limit]
    assert set(zero.nonzero().flatten().tolist()) == set(smallest.tolist())
