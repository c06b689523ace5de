"""Parity with the authors' implementation (``only-train-once``, in the ``[test]`` extra).

HESSO runs next to the reference HESSO of ``only-train-once`` 3.0.1 on small models with fixed
gradients: the same groups are chosen in every period and the weights agree within float
tolerance over a whole schedule, once the reference's documented quirks are disabled by
monkeypatching *the reference* (never hf_oto):

- its Adam/AdamW moments start at ``g`` and ``g^2`` (then bias-corrected as if from 0): they are
  made to start at 0, as torch's; the unpatched first step is asserted to be
  ``sqrt(1 - beta2) / (1 - beta1)`` times ours;
- its cosine criterion is read the other way (importance ``cos + 1``; see
  :func:`hf_oto.optim.hesso.importance_scores`): it is replaced by ours, ``1 - cos`` (0 for a
  zero group). With zero groups scoring lowest, its other quirk, cutting the candidates of later
  periods by group index (``np.setdiff1d`` sorts) rather than by score, has nothing to cut.

The groups are the reference's node groups (a layer's output rows, with its norm's scale and
shift), mapped to a :class:`ZeroInvariantGroups`; the test also checks they are the rows of
``find_groups``' groups, which hold the consumer's input columns as well.

The reference does not import on current torch (``torch.onnx._globals`` moved): the test puts the
few names it needs back, inside the test only.

DHSPG is gone from 3.x; its last release is 2.0.16, which cannot be installed next to 3.0.1 (one
distribution name). Its parity test runs when ``HF_OTO_REFERENCE_V2`` names an unpacked 2.0.16
wheel (``pip download only-train-once==2.0.16 --no-deps`` then unzip) and is skipped otherwise.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import types

import pytest
import torch
from torch import nn

from hf_oto import find_groups
from hf_oto.groups import GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups
from hf_oto.optim import DHSPG, HESSO

STEPS_BEFORE, PERIODS, PERIOD_STEPS, STEPS_AFTER = 2, 3, 4, 3


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)), \
        torch.randn(2, 10)


def _convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():  # BatchNorm starts at 1 and 0: make its groups' entries distinct
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(2, 3, 8, 8)


@pytest.fixture
def oto(monkeypatch):
    """The reference package, importable on current torch and runnable without CUDA."""
    try:
        from torch.onnx._internal.torchscript_exporter import _globals, utils
    except ImportError:
        pytest.skip("this torch has no TorchScript ONNX exporter for the reference's graph")
    if "torch.onnx._globals" not in sys.modules:
        monkeypatch.setitem(sys.modules, "torch.onnx._globals", _globals)
    if not hasattr(torch.onnx, "_optimize_graph"):
        monkeypatch.setattr(torch.onnx, "_optimize_graph", utils._optimize_graph, raising=False)
    oto = pytest.importorskip("only_train_once", reason="only-train-once (the [test] extra) is not installed")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # it moves masks to CUDA
    return oto


def _reference_groups(model, param_groups) -> tuple[ZeroInvariantGroups, list[tuple[str, int, int]]]:
    """The reference's prunable node groups as ZeroInvariantGroups: group ``offset + i`` is row i
    of every parameter of node group ``id``. Returns the groups and (id, offset, count) per node group."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, slices, layout, offset = [], [], [], 0
    for pg in param_groups:
        if not pg["is_prunable"] or pg["is_auxiliary"]:
            continue
        n = pg["num_groups"]
        assert {t.name for t in pg["p_transform"]} <= {"BASIC", "ACCESSORY"}, pg["p_transform"]
        size = sum(p[0].numel() for p in pg["params"])
        for i in range(n):
            groups.append(ZeroInvariantGroup(offset + i, "neuron", pg["id"], True, "", size))
        for p in pg["params"]:
            slices.append(GroupSlice(names[id(p)], True, 0, torch.arange(n), torch.arange(n) + offset))
        layout.append((pg["id"], offset, n))
        offset += n
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return ZeroInvariantGroups(groups, slices, shapes, {}), layout


def _check_rows_of_our_groups(model, inputs, ref_groups: ZeroInvariantGroups) -> None:
    """Every reference group is, on its parameters, exactly the rows of one of our prunable groups;
    ours also holds the consumer's columns (dim 1 of the next layer's weight)."""
    ours = find_groups(model, inputs)
    assert ours.num_prunable == ref_groups.num_prunable
    matched = set()
    for g in range(len(ref_groups)):
        where = {(s.tensor, int(s.index[s.group == g][0])) for s in ref_groups.slices if (s.group == g).any()}
        owners = {int(s.group[s.index == pos][0]) for s in ours.slices for (name, pos) in where
                  if s.tensor == name and s.dim == 0 and (s.index == pos).any()}
        assert len(owners) == 1, (g, owners)
        owner = owners.pop()
        assert ours.prunable_mask[owner] and owner not in matched
        matched.add(owner)
        tensors = {(s.tensor, s.dim) for s in ours.slices if (s.group == owner).any()}
        assert {(n, 0) for n, _ in where} < tensors and any(d == 1 for _, d in tensors)


def _grads(model, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _reference_redundant(ref, layout, num_groups: int) -> torch.Tensor:
    out = torch.zeros(num_groups, dtype=torch.bool)
    for gid, offset, _ in layout:
        for i in list(ref.pruned_idxes[gid]) + list(ref.active_redundant_idxes[gid]):
            out[offset + i] = True
    return out


def _torch_moments_in_reference(monkeypatch, cls) -> None:
    """Make the reference's first and second moments start at 0 (torch's Adam), not at g and g^2."""
    for method, store in (("get_first_momentum_grad", "first_moment_grads"),
                          ("get_second_momentum_grad_square", "second_moment_grads")):
        def from_zero(self, *args, _original=getattr(cls, method), _store=store):
            *head, beta, _, grad = args  # head: (name,) in HESSO, (param group, name) in DHSPG
            buffers = getattr(self, _store) if len(head) == 1 else head[0]
            if beta > 0 and head[-1] not in buffers:
                buffers[head[-1]] = torch.zeros_like(grad)  # then beta * 0 + (1 - beta) * g
            return _original(self, *args)

        monkeypatch.setattr(cls, method, from_zero)


def _our_cosine_in_reference(monkeypatch) -> None:
    """Replace the reference's cosine importance (cos + 1) by ours (1 - cos; 0 for a zero group)."""
    scores = sys.modules["only_train_once.optimizer.importance_score"]
    original = scores.importance_score_by_cosine_similarity_dhspg

    def ours(param_group):
        original(param_group)
        n = param_group["num_groups"]
        norm = sum(p.detach().reshape(n, -1).square().sum(1) for p in param_group["params"])
        reference = param_group["importance_scores"]["cosine_similarity"]
        param_group["importance_scores"]["cosine_similarity"] = torch.where(norm > 0, 2 - reference,
                                                                            torch.zeros_like(reference))

    monkeypatch.setattr(scores, "importance_score_by_cosine_similarity_dhspg", ours)


VARIANTS = {
    "sgd": (dict(lr=0.05, momentum=0.9, weight_decay=1e-3), dict(lr=0.05, first_momentum=0.9, weight_decay=1e-3)),
    "adam": (dict(lr=0.01, weight_decay=1e-3), dict(lr=0.01, first_momentum=0.9, second_momentum=0.999,
                                                    weight_decay=1e-3)),
    "adamw": (dict(lr=0.01, weight_decay=0.05), dict(lr=0.01, first_momentum=0.9, second_momentum=0.999,
                                                     weight_decay=0.05)),
}


@pytest.mark.parametrize("build", [_mlp, _convnet], ids=["mlp", "convnet"])
@pytest.mark.parametrize("variant", ["sgd", "adam", "adamw"])
def test_hesso_matches_the_reference_hesso(oto, monkeypatch, capsys, build, variant):
    from only_train_once.optimizer import HESSO as ReferenceHESSO

    model, inputs = build()
    ours_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = oto.OTO(ref_model, inputs)
    groups, layout = _reference_groups(ref_model, reference._graph.get_param_groups())
    _check_rows_of_our_groups(copy.deepcopy(model), inputs, groups)
    if variant != "sgd":
        _torch_moments_in_reference(monkeypatch, ReferenceHESSO)
    _our_cosine_in_reference(monkeypatch)
    ours_kw, ref_kw = VARIANTS[variant]
    target = 12.5 / groups.num_prunable  # K = int(12.5) = 12 on both sides: 4 groups per period
    window = PERIODS * PERIOD_STEPS
    ref = reference.hesso(variant=variant, target_group_sparsity=target, start_pruning_step=STEPS_BEFORE,
                          pruning_steps=window, pruning_periods=PERIODS, **ref_kw)
    ours = HESSO(ours_model, groups, variant=variant, eps=1e-8, target_group_sparsity=target,
                 start_pruning_step=STEPS_BEFORE, pruning_steps=window, pruning_periods=PERIODS,
                 selection={"saliency": "mixed", "pruning_schedule": "linear"}, **ours_kw)
    ours_params, ref_params = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())
    chosen = []
    for step in range(STEPS_BEFORE + window + STEPS_AFTER):
        for n, g in _grads(model, step).items():
            ours_params[n].grad, ref_params[n].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        redundant = _reference_redundant(ref, layout, len(groups))
        assert torch.equal(ours.redundant_groups(), redundant), step
        assert torch.equal(ours.zero_groups(), groups.zero_mask(groups.parameters(ref_model))), step
        for n, p in ours_params.items():
            assert torch.allclose(p, ref_params[n], rtol=1e-5, atol=1e-6), (step, n, (p - ref_params[n]).abs().max())
        chosen.append(int(redundant.sum()))
    capsys.readouterr()  # the reference prints its progress
    per_period = [chosen[STEPS_BEFORE + p * PERIOD_STEPS] for p in range(PERIODS)]
    assert per_period == [4, 8, 12] and int(ours.zero_groups().sum()) == 12
    assert chosen[:STEPS_BEFORE] == [0] * STEPS_BEFORE


def test_documented_differences_from_the_reference_hesso(oto, capsys):
    """What is left different: the reference's Adam moments (its first step is
    sqrt(1 - beta2)/(1 - beta1) times torch's) and its split of K over periods (K // P each, the
    remainder to the last; ours floor(K (p + 1) / P) cumulative)."""
    from hf_oto.optim.base import cumulative_targets

    model, inputs = _mlp()
    ours_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = oto.OTO(ref_model, inputs)
    groups, _ = _reference_groups(ref_model, reference._graph.get_param_groups())
    ref = reference.hesso(variant="adam", lr=0.01, first_momentum=0.9, second_momentum=0.999, weight_decay=0.0,
                          start_pruning_step=100, pruning_steps=10)
    ours = HESSO(ours_model, groups, variant="adam", lr=0.01, eps=1e-8, start_pruning_step=100, pruning_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours_params, ref_params = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())
    for n, g in _grads(model, 0).items():
        ours_params[n].grad, ref_params[n].grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    for n, p in ours_params.items():
        ratio = (ref_params[n].detach() - before[n]) / (p.detach() - before[n])
        assert torch.allclose(ratio, torch.full_like(ratio, (1 - 0.999) ** 0.5 / (1 - 0.9)), rtol=1e-3)
    k11 = reference.hesso(variant="sgd", lr=0.1, target_group_sparsity=11.5 / groups.num_prunable,
                          pruning_steps=9, pruning_periods=3)
    assert k11.active_num_redundant_groups == [3, 3, 5]
    ours_split = cumulative_targets(11, 3)
    assert [b - a for a, b in zip([0] + ours_split, ours_split)] == [3, 4, 4]
    capsys.readouterr()


# -- DHSPG: only-train-once 2.0.16, when provided -------------------------------------------------------


@pytest.fixture
def reference_dhspg(monkeypatch):
    root = os.environ.get("HF_OTO_REFERENCE_V2")
    if not root:
        pytest.skip("set HF_OTO_REFERENCE_V2 to an unpacked only-train-once 2.0.16 wheel (the last release "
                    "with DHSPG; it cannot be installed next to 3.x)")
    package = os.path.join(root, "only_train_once")
    path = os.path.join(package, "optimizer", "dhspg.py")
    if not os.path.isfile(path):
        pytest.fail(f"HF_OTO_REFERENCE_V2={root} holds no only_train_once/optimizer/dhspg.py")
    # Load only the optimizer, under its own name: the package's __init__ needs the ONNX graph code.
    for name, sub in (("_oto_v2", package), ("_oto_v2.optimizer", os.path.join(package, "optimizer"))):
        module = types.ModuleType(name)
        module.__path__ = [sub]
        monkeypatch.setitem(sys.modules, name, module)
    # It imports ``assets.group_types`` from its own folder (appended to sys.path); 3.x does the
    # same with an ``assets`` that lacks it: put 2.0.16's first, and restore everything after.
    monkeypatch.setattr(sys, "path", [package] + sys.path)
    for name in [n for n in sys.modules if n == "assets" or n.startswith("assets.")]:
        monkeypatch.delitem(sys.modules, name)
    known = set(sys.modules)
    spec = importlib.util.spec_from_file_location("_oto_v2.optimizer.dhspg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    yield module
    for name in set(sys.modules) - known:
        sys.modules.pop(name, None)


def _dhspg_param_groups(model, group_types) -> tuple[list[dict], ZeroInvariantGroups]:
    """The MLP's layers as the reference's param groups (rows of weight and bias) and as ours."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    names = {id(p): n for n, p in model.named_parameters()}
    pgs, zigs, slices, offset = [], [], [], 0
    for k, layer in enumerate(linears):
        params = [layer.weight, layer.bias]
        last = k == len(linears) - 1
        pgs.append({"params": params, "group_type": group_types["default" if last else "linear"],
                    "num_groups": layer.out_features, "auxiliary_ccs": [], "upper_group_sparsity": 1.0,
                    "epsilon": 0.0, "names": [names[id(p)] for p in params], "cc_id": str(k)})
        if last:
            continue
        n = layer.out_features
        zigs += [ZeroInvariantGroup(offset + i, "neuron", str(k), True, "", layer.in_features + 1) for i in range(n)]
        slices += [GroupSlice(names[id(p)], True, 0, torch.arange(n), torch.arange(n) + offset) for p in params]
        offset += n
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return pgs, ZeroInvariantGroups(zigs, slices, shapes, {})


WINDOW = 20


def _dhspg_pair(reference_dhspg, monkeypatch, variant: str, lmbda: float, tolerance: float):
    model, _ = _mlp()
    ours_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    pgs, groups = _dhspg_param_groups(ref_model, reference_dhspg.GROUP_TYPE)
    if variant != "sgd":
        _torch_moments_in_reference(monkeypatch, reference_dhspg.DHSPG)
    ours_kw, ref_kw = ({**kw, "lr": 0.01} for kw in VARIANTS[variant])
    target = 7 / groups.num_prunable  # 0.25 of 28 groups; exact in floats, as tolerance * 28 must be
    ref = reference_dhspg.DHSPG(pgs, variant=variant, lmbda=lmbda, target_group_sparsity=target,
                                tolerance_group_sparsity=tolerance, start_pruning_steps=STEPS_BEFORE, **ref_kw)
    ours = DHSPG(ours_model, groups, variant=variant, eps=1e-8, lmbda=lmbda, target_group_sparsity=target,
                 tolerance_group_sparsity=tolerance, start_pruning_step=STEPS_BEFORE, pruning_steps=WINDOW,
                 selection={"saliency": "mixed", "pruning_schedule": "linear"}, **ours_kw)
    ours_params, ref_params = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())

    def step(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        for n, g in _grads(model, k).items():
            ours_params[n].grad, ref_params[n].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        return ours.zero_groups(), groups.zero_mask(groups.parameters(ref_model))

    return ours, groups, ours_params, ref_params, step


def _same_weights(ours_params, ref_params) -> bool:
    return all(torch.allclose(p, ref_params[n], rtol=1e-5, atol=1e-6) for n, p in ours_params.items())


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_dhspg_matches_the_reference_dhspg(reference_dhspg, monkeypatch, capsys, variant):
    """One partition with no spare groups (tolerance 0: the reference cannot overshoot): the same
    partition, adaptive lambdas, subgradient steps and half-space projections, weights within
    float tolerance, step after step. At the window's last step the difference we document: the
    groups the half-space test has not reached yet are forced to zero on our side (the target is
    met exactly), the reference keeps penalising them."""
    ours, groups, ours_params, ref_params, step = _dhspg_pair(reference_dhspg, monkeypatch, variant, 30.0, 0.0)
    for k in range(STEPS_BEFORE + WINDOW - 1):
        ours_zero, ref_zero = step(k)
        assert torch.equal(ours_zero, ref_zero), k
        assert _same_weights(ours_params, ref_params), k
    crossed = int(ours.metrics()["num_halfspace_projections"])
    assert 3 <= crossed < 7 == int(ours.redundant_groups().sum())  # some crossed, the rest still in R
    ours_zero, ref_zero = step(STEPS_BEFORE + WINDOW - 1)
    m = ours.metrics()
    assert m["num_zero_groups"] == 7 and m["num_forced_projections"] == 7 - m["num_halfspace_projections"] > 0
    assert bool((ref_zero <= ours_zero).all()) and int(ref_zero.sum()) < 7
    groups.zero_([ref_params[n].detach() for n in groups.param_names], ours_zero & ~ref_zero)  # the forced ones
    assert _same_weights(ours_params, ref_params)  # everything else took the same step
    capsys.readouterr()


def test_dhspg_caps_where_the_reference_overshoots(reference_dhspg, monkeypatch, capsys):
    """With spare groups in the redundant set and a lambda that carries all of them across at
    once, the reference projects every crossing group (its target check comes once per step):
    it overshoots to the whole redundant set. We stop at the target, with the deepest crossings,
    a subset of the reference's."""
    ours, groups, ours_params, ref_params, step = _dhspg_pair(reference_dhspg, monkeypatch, "sgd", 200.0, 0.25)
    for k in range(STEPS_BEFORE):
        step(k)
    assert _same_weights(ours_params, ref_params)
    ours_zero, ref_zero = step(STEPS_BEFORE)
    assert int(ours_zero.sum()) == 7 < int(ref_zero.sum()) <= 14
    assert bool((ours_zero <= ref_zero).all())
    capsys.readouterr()
