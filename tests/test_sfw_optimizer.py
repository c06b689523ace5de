"""The SFW optimizer: iterates stay feasible, the step is the documented one, state round-trips."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from hf_oto import find_groups
from hf_oto.optim.sfw import SFW, GroupKSupportBall
from hf_oto.testing.zoo import build


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def batches(n, seed=0, dim=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, dim, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(n)]


def train_steps(model, opt, data, check=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if check:
            check()


@pytest.mark.parametrize("structure", ["prune", "low_rank", "k_sparse", "l2"])
def test_mlp_iterates_stay_inside_every_set(structure):
    model = mlp()
    groups = find_groups(model, (torch.randn(2, 6),)) if structure == "prune" else None
    opt = SFW.from_model(model, groups, structure=structure, lr=1.0, k=0.3, radius_factor=1.5)
    names = {s.name for s, _ in opt.constraint_sets()}
    # every MLP tensor is touched by some group: the entries no prunable group owns (the output
    # layer's rows) are L2 blocks inside the group set
    expected = {"prune": {"group_k_support"}, "low_rank": {"k_support_nuclear", "l2"},
                "k_sparse": {"k_sparse", "l2"}, "l2": {"l2"}}[structure]
    assert names == expected
    opt.make_feasible_()
    assert opt.contains()
    before = [p.detach().clone() for p in model.parameters()]

    def check():
        for s, ts in opt.constraint_sets():
            assert bool((s.gauge(ts) <= s.radii * (1 + 1e-5)).all()), (s.name, s.gauge(ts), s.radii)

    train_steps(model, opt, batches(25), check)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a large lr pushes iterates to the boundary: the check above was not vacuous
    assert max(float((s.gauge(ts) / s.radii).max()) for s, ts in opt.constraint_sets()) > 0.5


@pytest.mark.parametrize("structure", ["prune", "low_rank"])
def test_cnn_with_batchnorm_and_overlapping_channel_groups_stays_inside(structure):
    model, inputs = build("vgg-bn")
    model.train()
    groups = find_groups(model, inputs) if structure == "prune" else None
    opt = SFW.from_model(model, groups, structure=structure, lr=2.0, k=0.25, radius_factor=1.2)
    if structure == "prune":
        ball = next(s for s, _ in opt.constraint_sets() if isinstance(s, GroupKSupportBall))
        assert ball.num_group_blocks >= 4          # one block per conv / linear layer, not one per model
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        opt.zero_grad()
        x = torch.randn(4, 3, 16, 16, generator=g)
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=g)).backward()
        opt.step()
        assert opt.contains()


def test_step_is_momentum_lmo_and_gradient_rescaled_convex_combination():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = SFW([p], lr=0.1, momentum=0.5, constraint="l2", radius_factor=2.0)
    assert opt.param_groups[0]["radii"] == [[10.0]]                 # 2 x the initial norm 5
    x, m = p.detach().clone(), None
    for grad in ([1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]):
        g = torch.tensor(grad, dtype=torch.float64)
        m = g.clone() if m is None else 0.5 * m + 0.5 * g
        v = -10.0 * m / m.norm()
        eta = min(0.1 * float(m.norm()) / float((v - x).norm()), 1.0)
        x = x + eta * (v - x)
        p.grad = g
        opt.step()
        torch.testing.assert_close(p.detach(), x)
    # without rescaling the step is lr itself
    q = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = SFW([q], lr=0.25, momentum=0.0, rescale=None, radius=10.0)
    q.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([2.25, 0.5], dtype=torch.float64))


def test_k_sparse_radius_keeps_the_l2_diameter_and_the_first_step_makes_the_start_feasible():
    p = nn.Parameter(torch.ones(16))                  # norm 4
    opt = SFW([p], constraint="k_sparse", k=4, radius_factor=1.0)
    entry_bound = opt.param_groups[0]["radii"][0][0]
    assert entry_bound == pytest.approx(4.0 / math.sqrt(4))        # vertices have L2 norm 4
    assert torch.equal(p.detach(), torch.ones(16)) and not opt.contains()   # construction changes nothing
    # ||p||_1 / K = 4 > 2: the step first scales the start onto the polytope
    p.grad = torch.zeros(16)
    opt.step()
    assert float(p.detach().abs().sum()) / 4 == pytest.approx(entry_bound) and opt.contains()
    big = nn.Parameter(torch.full((3,), 10.0))
    SFW([big], radius=1.0).make_feasible_()
    assert float(big.detach().norm()) == pytest.approx(1.0)


def test_unused_parameters_are_skipped_in_tensor_sets():
    model = mlp()
    extra = nn.Parameter(torch.randn(4))
    opt = SFW([*model.parameters(), extra], lr=0.5)
    before = extra.detach().clone()
    train_steps(model, opt, batches(2))
    assert torch.equal(extra, before)


def test_state_dict_round_trip_resumes_bit_for_bit():
    model = mlp()
    groups = find_groups(model, (torch.randn(2, 6),))
    opt = SFW.from_model(model, groups, structure="prune", lr=0.8, radius_factor=2.0)
    data = batches(8)
    train_steps(model, opt, data[:4])
    saved_model = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)            # plain data only: a Trainer checkpoint

    clone = mlp(seed=1)
    clone.load_state_dict(saved_model)
    # a fresh optimizer would take radii from the trained norms; loading restores the saved ones
    opt2 = SFW.from_model(clone, groups, structure="prune", lr=0.8, radius_factor=2.0)
    assert opt2.param_groups[0]["radii"] != opt.param_groups[0]["radii"]
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["radii"] == opt.param_groups[0]["radii"]
    train_steps(model, opt, data[4:])
    train_steps(clone, opt2, data[4:])
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_low_rank_steps_never_run_a_full_svd(monkeypatch):
    model = mlp()
    opt = SFW.from_model(model, structure="low_rank", lr=0.5, k=0.5)

    def forbidden(*args, **kwargs):
        raise AssertionError("a full SVD ran inside an SFW step")

    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(torch.linalg, "svdvals", forbidden)
    monkeypatch.setattr(torch, "svd", forbidden)
    # the first step checks the start's feasibility with a bound that needs no SVD here
    train_steps(model, opt, batches(3))
    sketches = [opt.state[p].get("sketch") for p in model.parameters() if p.dim() == 2]
    assert sum(s is not None for s in sketches) >= 2           # warm starts are kept per layer


def test_bad_options_raise_clear_errors():
    p = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="lr"):
        SFW(p, lr=0.0)
    with pytest.raises(ValueError, match="lr must be in"):
        SFW(p, lr=1.5, rescale=None)
    with pytest.raises(ValueError, match="momentum"):
        SFW(p, momentum=1.0)
    with pytest.raises(ValueError, match="rescale"):
        SFW(p, rescale="diameter")
    with pytest.raises(ValueError, match="unknown constraint"):
        SFW(p, constraint="l1")
    for k in (0, 1.5, 0.0, -2, "half", True):
        with pytest.raises(ValueError, match="k "):
            SFW(p, k=k)
    with pytest.raises(ValueError, match="radius_factor"):
        SFW(p, radius_factor=-1.0)
    with pytest.raises(ValueError, match="radius"):
        SFW(p, radius=0.0)
    with pytest.raises(ValueError, match="power_iterations"):
        SFW(p, power_iterations=0)
    with pytest.raises(ValueError, match="groups="):
        SFW(p, constraint="group_k_support")
    model = mlp()
    groups = find_groups(model, (torch.randn(2, 6),))
    with pytest.raises(ValueError, match="param_names"):
        SFW(p, constraint="group_k_support", groups=groups)
    with pytest.raises(ValueError, match="structure"):
        SFW.from_model(model, groups, structure="filters")
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        SFW.from_model(model, groups, structure="prune")
