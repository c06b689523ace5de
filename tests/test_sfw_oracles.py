"""Every SFW linear minimisation oracle equals a brute-force minimiser on small random inputs."""

import itertools
import math

import pytest
import torch
from torch import nn

from hf_oto import find_groups
from hf_oto.groups import GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups
from hf_oto.optim.sfw import (
    GroupKSupportBall,
    KSparsePolytope,
    KSupportNuclearBall,
    L2Ball,
    k_support_norm,
    lmo_k_sparse,
    lmo_k_support_nuclear,
    lmo_l2,
)


def dot(a, b):
    return float((a.double() * b.double()).sum())


# -- L2 ball ---------------------------------------------------------------------------------

def test_l2_lmo_beats_every_point_of_a_dense_sphere_sample():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = torch.randn(3, generator=g, dtype=torch.float64)
        v = lmo_l2(m, 2.5)
        pts = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
        pts = 2.5 * pts / pts.norm(dim=1, keepdim=True)            # the minimum is on the sphere
        brute = float((pts @ m).min())
        assert dot(v, m) <= brute + 1e-12
        assert dot(v, m) == pytest.approx(brute, abs=2e-3 * m.norm().item())
        assert float(v.norm()) == pytest.approx(2.5)
    assert torch.equal(lmo_l2(torch.zeros(4), 1.0), torch.zeros(4))


# -- K-sparse polytope -----------------------------------------------------------------------

def k_sparse_vertices(n, k, radius):
    for support in itertools.combinations(range(n), k):
        for signs in itertools.product((-1.0, 1.0), repeat=k):
            v = torch.zeros(n, dtype=torch.float64)
            v[list(support)] = radius * torch.tensor(signs, dtype=torch.float64)
            yield v


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_k_sparse_lmo_equals_vertex_enumeration(k):
    g = torch.Generator().manual_seed(k)
    for _ in range(4):
        m = torch.randn(7, generator=g, dtype=torch.float64)
        v = lmo_k_sparse(m, k, 0.7)
        brute = min(dot(w, m) for w in k_sparse_vertices(7, k, 0.7))
        assert dot(v, m) == pytest.approx(brute, rel=1e-12)
        assert int((v != 0).sum()) == k and float(v.abs().max()) == pytest.approx(0.7)
    # shapes are kept: a matrix is treated as its flattened entries
    mat = torch.randn(3, 4, generator=g)
    assert lmo_k_sparse(mat, 2, 1.0).shape == (3, 4)


# -- group-K-support -------------------------------------------------------------------------

def toy_groups():
    """Two weights with overlapping groups: W1 rows (groups 0-3), W2 rows (4-6) and columns (0-3),
    a bias b1 (0-3), an unprunable group 7 on W2's last row. Blocks: W1's layer and W2's layer."""
    groups = [ZeroInvariantGroup(i, "neuron", "", i != 7, "" if i != 7 else "output", 0) for i in range(8)]
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    slices = [
        GroupSlice("l1.weight", True, 0, long([0, 1, 2, 3]), long([0, 1, 2, 3])),
        GroupSlice("l1.bias", True, 0, long([0, 1, 2, 3]), long([0, 1, 2, 3])),
        GroupSlice("l2.weight", True, 0, long([0, 1, 2, 3]), long([4, 5, 6, 7])),
        GroupSlice("l2.weight", True, 1, long([0, 1, 2, 3]), long([0, 1, 2, 3])),
    ]
    shapes = {"l1.weight": (4, 3), "l1.bias": (4,), "l2.weight": (4, 5)}   # l2 column 4: no group
    return ZeroInvariantGroups(groups, slices, shapes, {k: [k] for k in shapes})


def owner_masks(groups, shapes):
    """Brute force ownership, entry by entry: the group covering it along its lowest dim."""
    masks = {g: [torch.zeros(s, dtype=torch.bool) for s in shapes] for g in range(len(groups))}
    rest = [torch.zeros(s, dtype=torch.bool) for s in shapes]
    for t, (name, shape) in enumerate(zip(groups.param_names, shapes)):
        for idx in itertools.product(*[range(n) for n in shape]):
            owner = None
            for s in sorted(groups.slices, key=lambda s: s.dim):
                if s.tensor != name:
                    continue
                hit = (s.index == idx[s.dim]).nonzero()
                if hit.numel() and groups[int(s.group[hit[0, 0]])].prunable:
                    owner = int(s.group[hit[0, 0]])
                    break
            if owner is None:
                rest[t][idx] = True
            else:
                masks[owner][t][idx] = True
    return masks, rest


def brute_group_lmo(m, masks, rest, blocks, ks, radii, n_group_blocks):
    """Minimise <m, v> block by block over every support of at most K groups."""
    v = [torch.zeros_like(t, dtype=torch.float64) for t in m]
    for b, members in enumerate(blocks):
        best, best_v = 0.0, None
        for size in range(1, ks[b] + 1):
            for subset in itertools.combinations(members, size):
                sel = [sum(masks[g][t] for g in subset).bool() for t in range(len(m))]
                sq = sum(float(m[t].double()[sel[t]].square().sum()) for t in range(len(m)))
                val = -radii[b] * math.sqrt(sq)
                if val < best - 1e-12:
                    best = val
                    best_v = [torch.where(sel[t], -radii[b] * m[t].double() / math.sqrt(sq), 0.0)
                              for t in range(len(m))]
        if best_v is not None:
            v = [a + c for a, c in zip(v, best_v)]
    for t in range(len(m)):
        mr = m[t].double()[rest[t]]
        if mr.numel() and mr.norm() > 0:
            v[t][rest[t]] = -radii[n_group_blocks + t] * mr / mr.norm()
    return v


@pytest.mark.parametrize("k", [1, 2, 3, 0.5])
def test_group_k_support_lmo_equals_subset_enumeration(k):
    groups = toy_groups()
    shapes = [groups.tensor_shapes[n] for n in groups.param_names]
    g = torch.Generator().manual_seed(3)
    ball = GroupKSupportBall(groups, shapes, k, [1.5, 0.8, 0.3, 0.4, 0.9])
    # blocks follow the producing layer: groups 0-3 own l1 rows, 4-6 own l2 rows
    assert ball.num_group_blocks == 2 and ball.group_block.tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    masks, rest = owner_masks(groups, shapes)
    # ownership is a partition of every entry
    cover = [sum(masks[g][t].int() for g in masks) + rest[t].int() for t in range(len(shapes))]
    assert all(bool((c == 1).all()) for c in cover)
    for _ in range(5):
        m = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        v = ball.lmo(m)
        brute = brute_group_lmo(m, masks, rest, [[0, 1, 2, 3], [4, 5, 6]],
                                ball.block_k.tolist(), ball.radii.tolist(), ball.num_group_blocks)
        assert sum(dot(a, b) for a, b in zip(v, m)) == pytest.approx(sum(dot(a, b) for a, b in zip(brute, m)),
                                                                     rel=1e-10)
        for a, b in zip(v, brute):
            torch.testing.assert_close(a, b)
        assert ball.contains(v, rtol=1e-9)


def test_group_k_support_on_a_real_mlp_matches_enumeration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = find_groups(model, (torch.randn(2, 3),))
    params = groups.parameters(model)
    ball = GroupKSupportBall.from_params(groups, params, 2, radius_factor=3.0)
    assert sorted(ball.block_names) == ["0:neuron", "2:neuron"]
    shapes = [tuple(p.shape) for p in params]
    masks, rest = owner_masks(groups, shapes)
    blocks = [[g for g in range(len(groups)) if int(ball.group_block[g]) == b] for b in range(ball.num_group_blocks)]
    m = [torch.randn(s, dtype=torch.float64) for s in shapes]
    brute = brute_group_lmo(m, masks, rest, blocks, ball.block_k.tolist(), ball.radii.tolist(),
                            ball.num_group_blocks)
    for a, b in zip(ball.lmo(m), brute):
        torch.testing.assert_close(a, b)
    # the blocks partition every parameter entry: their squared norms add up to the total
    total = sum(float(p.detach().double().square().sum()) for p in params)
    assert float(ball.block_sq(params).sum()) == pytest.approx(total, rel=1e-6)


# -- K-support nuclear-norm ball ---------------------------------------------------------------

def nuclear_optimum(m, k, radius):
    s = torch.linalg.svdvals(m.double().reshape(m.shape[0], -1))
    return -radius * float(s[:k].norm())


def test_nuclear_lmo_equals_a_grid_search_over_rank_one_atoms():
    """K = 1 on 2x2 and 2x3 matrices: atoms are radius * u v^T with unit u, v."""
    g = torch.Generator().manual_seed(0)
    a = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)
    u = torch.stack([a.cos(), a.sin()], 1)                                   # unit circle
    th, ph = torch.meshgrid(torch.linspace(0, math.pi, 181, dtype=torch.float64),
                            torch.linspace(0, 2 * math.pi, 361, dtype=torch.float64), indexing="ij")
    sphere = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1).reshape(-1, 3)
    for cols, vecs in ((2, u), (3, sphere)):
        for _ in range(3):
            m = torch.randn(2, cols, generator=g, dtype=torch.float64)
            v, _ = lmo_k_support_nuclear(m, 1, 1.3, generator=torch.Generator().manual_seed(1))
            brute = float((1.3 * (u @ m @ vecs.T)).min())       # <m, r u w^T> = r u^T m w
            assert dot(v, m) <= brute + 1e-9
            assert dot(v, m) == pytest.approx(brute, rel=1e-3)
            assert torch.linalg.matrix_rank(v).item() == 1


@pytest.mark.parametrize("shape,k", [((12, 20), 1), ((12, 20), 4), ((20, 12), 5), ((6, 3, 2, 2), 3), ((30, 40), 10)])
def test_nuclear_lmo_equals_the_full_svd_solution(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    m = torch.randn(*shape, generator=g)
    radius = 2.0
    v, sketch = lmo_k_support_nuclear(m, k, radius, generator=torch.Generator().manual_seed(0))
    assert v.shape == m.shape
    mat = v.double().reshape(shape[0], -1)
    assert torch.linalg.matrix_rank(mat, atol=1e-5).item() <= k
    assert float(mat.norm()) == pytest.approx(radius, rel=1e-5)                 # an atom of the set
    assert dot(v, m) == pytest.approx(nuclear_optimum(m, k, radius), rel=1e-4)
    # the exact solution from the full SVD
    u, s, vh = torch.linalg.svd(m.double().reshape(shape[0], -1), full_matrices=False)
    exact = -radius * (u[:, :k] * s[:k]) @ vh[:k] / s[:k].norm()
    torch.testing.assert_close(mat, exact, atol=2e-4, rtol=0)
    # warm start: after a small change one block iteration is still (nearly) exact
    m2 = m + 0.05 * torch.randn(*shape, generator=g)
    v2, _ = lmo_k_support_nuclear(m2, k, radius, sketch, iterations=1)
    assert dot(v2, m2) == pytest.approx(nuclear_optimum(m2, k, radius), rel=1e-3)


def test_nuclear_lmo_with_full_rank_budget_is_the_l2_ball():
    m = torch.randn(4, 6)
    v, _ = lmo_k_support_nuclear(m, 4, 1.0)
    torch.testing.assert_close(v, lmo_l2(m, 1.0))
    vec = torch.randn(5)                              # a vector is a 1 x n matrix: rank <= 1
    torch.testing.assert_close(KSupportNuclearBall(1.0, 1).lmo([vec])[0], lmo_l2(vec, 1.0))


# -- gauges (membership tests rely on them) ----------------------------------------------------

def test_k_support_norm_closed_forms_and_dual_certificate():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.randn(8, generator=g, dtype=torch.float64) * torch.rand(8, generator=g, dtype=torch.float64)
        assert float(k_support_norm(w, 1)) == pytest.approx(float(w.abs().sum()))
        assert float(k_support_norm(w, 8)) == pytest.approx(float(w.norm()))
        for k in (2, 3, 5):
            norm = float(k_support_norm(w, k))
            dual = lambda u: float(u.abs().sort(descending=True).values[:k].norm())  # noqa: E731
            # weak duality: <w, u> <= ||w|| * ||u||_* for every u ...
            for _ in range(50):
                u = torch.randn(8, generator=g, dtype=torch.float64)
                assert dot(w, u) <= norm * dual(u) + 1e-9
            # ... and a certificate attains it: head entries as they are, tail entries at their mean
            z, order = w.abs().sort(descending=True)
            best = max(float(dot(w, cert) / dual(cert)) for cert in _certificates(w, z, order, k))
            assert best == pytest.approx(norm, rel=1e-9)


def _certificates(w, z, order, k):
    for r in range(k):
        head = k - r - 1
        u = z.clone()
        u[head:] = z[head:].sum() / (r + 1)
        cert = torch.zeros_like(w)
        cert[order] = u
        yield cert * w.sign()


def test_gauges_accept_convex_combinations_of_atoms_and_reject_scaled_ones():
    g = torch.Generator().manual_seed(1)
    sets = [(L2Ball(2.0), (5, 4)), (KSparsePolytope(0.5, 3), (5, 4)), (KSupportNuclearBall(2.0, 2), (5, 4))]
    for s, shape in sets:
        atoms = [s.lmo([torch.randn(shape, generator=g)])[0] for _ in range(6)]
        weights = torch.rand(6, generator=g)
        weights /= weights.sum()
        mix = sum(w * a for w, a in zip(weights, atoms))
        assert s.contains([mix]) and s.contains([atoms[0]])
        assert float(s.gauge([atoms[0]])) == pytest.approx(s.radius, rel=1e-5)
        assert not s.contains([1.01 * atoms[0]])
