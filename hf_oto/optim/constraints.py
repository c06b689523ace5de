"""The convex sets of Stochastic Frank-Wolfe (:mod:`hf_oto.optim.sfw`) and their linear minimisation oracles.

Per-tensor sets (an L2 ball, a K-sparse polytope, a K-support nuclear-norm ball over a matrix's
singular values) and one set over blocks of zero-invariant groups (a group K-support ball, whose
LMO keeps the K groups with the largest momentum norms). Each set knows its LMO, its gauge (the
norm whose unit ball it is, for membership checks) and how to expand per-block values onto
its tensors, so that the optimizer's step is vectorised per block.

Deviation: the top-K singular subspace is tracked across steps with one warm-started block power
iteration (plus oversampling) instead of a fresh partial SVD every step; the returned point is
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from ..groups import ZeroInvariantGroups

__all__ = [
    "ConstraintSet", "L2Ball", "KSparsePolytope", "GroupKSupportBall", "KSupportNuclearBall",
    "lmo_l2", "lmo_k_sparse", "lmo_k_support_nuclear", "k_support_norm", "resolve_k", "check_k", "CONSTRAINTS",
]

#: Constraint names accepted by :class:`SFW` (``constraint=`` or a param group's ``"constraint"``).
CONSTRAINTS = ("l2", "k_sparse", "group_k_support", "k_support_nuclear")


# -- small helpers ---------------------------------------------------------------------------------

def resolve_k(k: float | int, n: int) -> int:
    """``k`` as a count out of ``n``: an int is a count, a float in (0, 1] a fraction (at least 1)."""
    check_k(k)
    if isinstance(k, int):
        return min(k, n)
    return max(1, min(n, int(round(k * n))))


def check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"k as a count must be >= 1, got {k}")
    if isinstance(k, float) and not 0.0 < k <= 1.0:
        raise ValueError(f"k as a fraction must be in (0, 1], got {k}")


def _base_norm(norm: float) -> float:
    # A zero-initialised tensor (biases, LayerNorm shifts) would get a zero radius and never move.
    return norm if norm > 0 else 1.0


def _vec_view(vec: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.view(shape)


def k_support_norm(x: Tensor, k: int) -> Tensor:
    """The K-support norm of a vector (Argyriou, Foygel and Srebro, 2012), in float64.

    Its unit ball is the convex hull of the K-sparse vectors of L2 norm <= 1: it equals the L1
    norm for K = 1 and the L2 norm for K >= len(x).

    Example:
        >>> float(k_support_norm(torch.tensor([3.0, 4.0, 0.0]), 1)), float(k_support_norm(torch.tensor([3.0, 4.0]), 2))
        (7.0, 5.0)
    """
    z = x.detach().abs().flatten().double().sort(descending=True).values
    d = z.numel()
    if d == 0:
        return torch.zeros((), dtype=torch.float64)
    k = max(1, min(int(k), d))
    suffix = z.flip(0).cumsum(0).flip(0)
    head_sq = torch.cat([z.new_zeros(1), z.square().cumsum(0)])
    r = torch.arange(k)
    tail = k - r - 1                                  # first tail index (0-based) for each r
    mean = suffix[tail] / (r + 1)
    left = torch.where(tail > 0, z[(tail - 1).clamp(min=0)], torch.full_like(mean, math.inf))
    right = z[tail]
    # The r that satisfies z[tail-1] > mean >= z[tail] is unique; ties in floating point pick the
    # least violated one.
    violation = (mean - left).clamp(min=0) + (right - mean).clamp(min=0)
    violation[(left > mean) & (mean >= right)] = -1.0
    i = int(violation.argmin())
    return (head_sq[tail[i]] + (i + 1) * mean[i] ** 2).sqrt()


# -- linear minimisation oracles (pure functions) ----------------------------------------------

def lmo_l2(m: Tensor, radius: float) -> Tensor:
    """argmin of <m, v> over the L2 ball of ``radius``: ``-radius * m / ||m||`` (0 if m = 0).

    Example:
        >>> lmo_l2(torch.tensor([3.0, 4.0]), 10.0)
        tensor([-6., -8.])
    """
    norm = torch.linalg.vector_norm(m.float())
    if norm == 0:
        return torch.zeros_like(m)
    return m * (-radius / norm).to(m.dtype)


def lmo_k_sparse(m: Tensor, k: int, radius: float) -> Tensor:
    """argmin over the K-sparse polytope conv{K-sparse v, entries in [-radius, radius]}.

    ``-radius * sign(m)`` on the K entries of largest ``|m|``, 0 elsewhere.

    Example:
        >>> lmo_k_sparse(torch.tensor([0.5, -3.0, 1.0, 0.1]), 2, 2.0)
        tensor([ 0.,  2., -2.,  0.])
    """
    flat = m.flatten()
    k = max(1, min(int(k), flat.numel()))
    idx = flat.abs().topk(k).indices
    v = torch.zeros_like(flat)
    v[idx] = -radius * flat[idx].sign()
    return v.view_as(m)


def lmo_k_support_nuclear(
    m: Tensor,
    k: int,
    radius: float,
    sketch: Tensor | None = None,
    *,
    iterations: int = 1,
    cold_iterations: int = 8,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """argmin of <m, v> over the K-support nuclear-norm ball conv{rank-K V, ||V||_F <= radius}.

    ``v = -radius * sum_{i<=K} s_i u_i v_i^T / ||s_K||`` from the top-K singular triplets of the
    matrix ``m`` (trailing dims flattened). They come from a block power (subspace) iteration on
    ``K + oversample`` columns: ``cold_iterations`` from a random sketch, or ``iterations`` from the
    ``sketch`` a previous call returned (warm start: consecutive momenta differ little). The
    result is ``-radius * P m / ||P m||`` for the orthogonal projector P on the estimated top-K left
    singular space, so it is always exactly in the set; it is the exact minimiser once that space
    is converged (checked against a full SVD in the tests).

    Returns ``(v, sketch)``; pass the sketch back on the next call.

    Example:
        >>> m = torch.randn(64, 256)
        >>> v, sketch = lmo_k_support_nuclear(m, k=4, radius=1.0)      # cold start
        >>> torch.linalg.matrix_rank(v).item(), round(float(v.norm()), 4)
        (4, 1.0)
        >>> v, sketch = lmo_k_support_nuclear(m + 0.01 * torch.randn(64, 256), 4, 1.0, sketch)  # warm
    """
    mat = m.reshape(m.shape[0], -1) if m.dim() != 1 else m.reshape(1, -1)
    rows, cols = mat.shape
    transposed = rows > cols
    a = mat.t() if transposed else mat                # rows <= cols: the QR is on the short side
    r, c = a.shape
    k = max(1, int(k))
    if k >= r:
        # Every singular pair is kept: the set is the Frobenius (L2) ball.
        return lmo_l2(m, radius), None
    q = min(k + oversample, r)
    compute = a.to(torch.promote_types(a.dtype, torch.float32))
    if sketch is None or tuple(sketch.shape) != (c, q):
        sketch = torch.randn(c, q, generator=generator, device="cpu" if generator is None else generator.device,
                             dtype=compute.dtype).to(a.device)
        steps = max(1, cold_iterations)
    else:
        steps = max(1, iterations)
    for _ in range(steps):
        basis = torch.linalg.qr(compute @ sketch.to(compute.dtype)).Q    # (r, q), orthonormal
        proj = basis.t() @ compute                                      # (q, c) = basis^T a
        sketch = proj.t()
    evals, evecs = torch.linalg.eigh((proj @ proj.t()).double())        # ascending
    top = evecs[:, -k:].to(compute.dtype)
    norm = float(evals[-k:].clamp(min=0).sum().sqrt())
    if norm == 0.0:
        return torch.zeros_like(m), sketch
    # The projection of a on the top-K space, (basis top)(top^T basis^T a), grouped so that the only
    # large product is (r x q) @ (q x c).
    v = (basis @ (top @ top.t())) @ proj
    v.mul_(-radius / norm)
    if transposed:
        v = v.t()
    return v.reshape(m.shape).to(m.dtype), sketch


# -- constraint sets -----------------------------------------------------------------------------

class ConstraintSet:
    """A convex set over a list of tensors, made of blocks each with its own radius and step.

    Subclasses define the LMO, the blocks and the gauge (a norm with ``x in C <=> gauge(x) <=
    radius`` per block). ``radii`` is a float64 vector over blocks.
    """

    name: ClassVar[str] = ""
    radii: Tensor

    @property
    def num_blocks(self) -> int:
        return int(self.radii.numel())

    @torch.no_grad()
    def lmo(self, m: Sequence[Tensor], state: list[dict] | None = None) -> list[Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def block_sq(self, tensors: Sequence[Tensor]) -> Tensor:
        """Squared L2 norm of each block (float64)."""
        raise NotImplementedError

    def expand(self, values: Tensor, i: int, like: Tensor) -> Tensor:
        """``values`` (one per block) as a tensor broadcastable to tensor ``i``."""
        raise NotImplementedError

    @torch.no_grad()
    def gauge(self, tensors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @torch.no_grad()
    def contains(self, tensors: Sequence[Tensor], rtol: float = 1e-5) -> bool:
        """Whether every block lies in its ball (up to ``rtol`` of its radius)."""
        return bool((self.gauge(tensors) <= self.radii * (1 + rtol) + 1e-12).all())

    def surely_inside(self, tensors: Sequence[Tensor]) -> bool:
        """A cheap sufficient test of membership (False: compute the gauge to know)."""
        return False

    @torch.no_grad()
    def shift_inside_(self, tensors: Sequence[Tensor]) -> None:
        """Scale the blocks that lie outside onto the boundary (SFW needs a feasible start)."""
        if self.surely_inside(tensors):
            return
        g = self.gauge(tensors)
        factor = torch.where(g > self.radii, self.radii / g.clamp(min=1e-300), torch.ones_like(g))
        if (factor < 1).any():
            for i, t in enumerate(tensors):
                t.mul_(self.expand(factor, i, t))

    def lmo_and_block_sq(self, m: Sequence[Tensor], state: list[dict] | None) -> tuple[list[Tensor], Tensor]:
        """The LMO and the blocks' squared norms of ``m`` (sets that need both share the work)."""
        return self.lmo(m, state), self.block_sq(m)

    @torch.no_grad()
    def update_(self, params: Sequence[Tensor], moms: Sequence[Tensor], lr: float, rescale: str | None,
                state: list[dict]) -> Tensor:
        """One Frank-Wolfe step in place; returns the step size of every block."""
        v, m_sq = self.lmo_and_block_sq(moms, state)
        diff = [vi.sub_(x) for vi, x in zip(v, params)]                # v - x, reusing v's memory
        if rescale == "gradient":
            m_norm = m_sq.sqrt()
            d_norm = self.block_sq(diff).sqrt()
            eta = torch.where(d_norm > 0, lr * m_norm / d_norm.clamp(min=1e-300), torch.zeros_like(d_norm))
        else:
            eta = torch.full_like(self.radii, lr)
        eta = eta.clamp(0.0, 1.0)
        for i, (x, d) in enumerate(zip(params, diff)):
            x.add_(d.mul_(self.expand(eta, i, d)))
        return eta


class _TensorwiseSet(ConstraintSet):
    """A set on one tensor: a single block."""

    def __init__(self, radius: float) -> None:
        if not radius > 0 or not math.isfinite(radius):
            raise ValueError(f"radius must be a positive finite number, got {radius}")
        self.radii = torch.tensor([float(radius)], dtype=torch.float64)

    @property
    def radius(self) -> float:
        return float(self.radii[0])

    @torch.no_grad()
    def block_sq(self, tensors: Sequence[Tensor]) -> Tensor:
        t = tensors[0]
        return torch.linalg.vector_norm(t.to(torch.promote_types(t.dtype, torch.float32))).double().square().reshape(1)

    def expand(self, values: Tensor, i: int, like: Tensor) -> Tensor:
        return values.to(device=like.device, dtype=like.dtype).reshape(())


class L2Ball(_TensorwiseSet):
    """``{x : ||x||_2 <= radius}``."""

    name = "l2"

    @torch.no_grad()
    def lmo(self, m, state=None):
        return [lmo_l2(m[0], self.radius)]

    @torch.no_grad()
    def gauge(self, tensors):
        return torch.linalg.vector_norm(tensors[0].double()).reshape(1)


class KSparsePolytope(_TensorwiseSet):
    """conv{K-sparse x with entries in [-radius, radius]} = B_inf(radius) ∩ B_1(K * radius)."""

    name = "k_sparse"

    def __init__(self, radius: float, k: int) -> None:
        super().__init__(radius)
        self.k = int(k)

    @torch.no_grad()
    def lmo(self, m, state=None):
        return [lmo_k_sparse(m[0], self.k, self.radius)]

    @torch.no_grad()
    def gauge(self, tensors):
        x = tensors[0].double()
        return torch.maximum(x.abs().max(), x.abs().sum() / self.k).reshape(1)


class KSupportNuclearBall(_TensorwiseSet):
    """conv{matrices of rank <= K and Frobenius norm <= radius} (trailing dims flattened)."""

    name = "k_support_nuclear"

    def __init__(self, radius: float, k: int, *, iterations: int = 1, oversample: int = 8,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(radius)
        if iterations < 1:
            raise ValueError(f"power_iterations must be >= 1, got {iterations}")
        if oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        self.k = int(k)
        self.iterations = iterations
        self.oversample = oversample
        self.generator = generator

    @torch.no_grad()
    def lmo(self, m, state=None):
        st = state[0] if state else {}
        v, sketch = lmo_k_support_nuclear(m[0], self.k, self.radius, st.get("sketch"), iterations=self.iterations,
                                          oversample=self.oversample, generator=self.generator)
        if sketch is not None and state:
            st["sketch"] = sketch
        return [v]

    @torch.no_grad()
    def gauge(self, tensors):
        x = tensors[0].double()
        mat = x.reshape(1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1)
        return k_support_norm(torch.linalg.svdvals(mat), self.k).reshape(1)

    def surely_inside(self, tensors):
        # Split the spectrum into ceil(rank / K) chunks of K values: gauge <= sqrt(chunks) * ||x||_F.
        x = tensors[0]
        rank = 1 if x.dim() <= 1 else min(x.shape[0], x[0].numel())
        bound = math.sqrt(math.ceil(rank / self.k)) * float(torch.linalg.vector_norm(x.detach().double()))
        return bound <= self.radius


class GroupKSupportBall(ConstraintSet):
    """Group-K-support balls over zero-invariant groups, one per layer, and L2 balls for the rest.

    Blocks: the prunable groups of one ``(layer, kind)`` (the heads of one attention module, the
    neurons of one FFN, the channels one convolution writes) form a group-K-support ball
    ``conv{x : at most K groups non-zero, ||x||_2 <= radius}``; the entries of each tensor that no
    prunable group owns form an L2 ball of their own.

    Groups may overlap (a conv weight's rows belong to its own channels, its columns to the
    previous layer's). So that the blocks are disjoint, and the set is a product of balls with an
    exact LMO, each entry belongs to the group covering it along its *lowest* dimension: a conv
    channel owns its filter rows, bias and norm parameters, and the consumer columns that no other
    prunable group's rows cover (in Transformers, attention and FFN groups never compete). The
    ranking used to prune afterwards (:func:`hf_oto.compress` with ``ratio``) still uses whole
    groups.

    Everything is vectorised over groups: one reduction and one broadcast multiply per
    (tensor, dimension) the groups touch, whatever the number of groups.

    Args:
        groups: the model's groups; tensors are passed in ``groups.param_names`` order.
        shapes: the shapes of those tensors.
        k: per block, an int count or a float fraction of its groups.
        radii: per block (group blocks, then one rest block per tensor); :meth:`from_params`
            sets them from the tensors' norms.

    Example:
        >>> params = groups.parameters(model)                                    # doctest: +SKIP
        >>> ball = GroupKSupportBall.from_params(groups, params, k=0.3, radius_factor=2.0)  # doctest: +SKIP
        >>> v = ball.lmo([p.grad for p in params])     # K groups per layer, norm = radius  # doctest: +SKIP
        >>> ball.contains(params), ball.block_names[:2]                          # doctest: +SKIP
    """

    name = "group_k_support"

    def __init__(self, groups: ZeroInvariantGroups, shapes: Sequence[Sequence[int]], k: float | int,
                 radii: Sequence[float]) -> None:
        check_k(k)
        self.k_option = k
        self.shapes = [tuple(s) for s in shapes]
        if len(self.shapes) != len(groups.param_names):
            raise ValueError(f"group_k_support needs the {len(groups.param_names)} tensors of groups.param_names "
                             f"in that order, got {len(self.shapes)}")
        for name, shape in zip(groups.param_names, self.shapes):
            if tuple(groups.tensor_shapes[name]) != shape:
                raise ValueError(f"tensor for {name} has shape {shape}, the groups expect "
                                 f"{tuple(groups.tensor_shapes[name])} (pass groups.parameters(model))")
        prunable = groups.prunable_mask
        self.num_groups = len(groups)

        block, keys = groups.layer_blocks()
        self.block_names = [f"{layer or '<model>'}:{kind}" for layer, kind in keys]
        self.num_group_blocks = len(keys)
        self.group_block = block
        sizes = torch.bincount(block[block >= 0], minlength=self.num_group_blocks)
        self.block_k = torch.tensor([resolve_k(k, int(n)) for n in sizes.tolist()], dtype=torch.long)
        self.block_start = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])

        # Per tensor: the dims prunable groups touch, in ownership order (lowest dim first).
        per_tensor: list[list] = [[] for _ in groups.param_names]
        for j, s in groups._param_slices:
            if s.outer is not None:
                raise ValueError(f"group_k_support does not handle per-expert groups ({s.tensor}); "
                                 "use another SFW constraint for mixture-of-experts models")
            per_tensor[j].append(s)
        self._slices: list[list[dict[str, Tensor | int]]] = []
        for i, name in enumerate(groups.param_names):
            ndim = len(self.shapes[i])
            by_dim: dict[int, Tensor] = {}
            for s in per_tensor[i]:
                keep = prunable[s.group]
                if not keep.any():
                    continue
                gid = by_dim.setdefault(s.dim, torch.full((self.shapes[i][s.dim],), -1, dtype=torch.long))
                gid[s.index[keep]] = s.group[keep]
            entries = []
            prior: Tensor | None = None                          # True where no earlier dim owns
            for dim in sorted(by_dim):
                gid = by_dim[dim]
                own = gid >= 0
                pos = own.nonzero().flatten()
                entries.append({"dim": dim, "own": own, "pos": pos, "gid": gid[pos], "prior": prior})
                free = _vec_view(~own, dim, ndim)
                prior = free if prior is None else prior & free
            self._slices.append(entries)
        self.radii = torch.as_tensor(list(radii), dtype=torch.float64)
        if self.radii.numel() != self.num_blocks_expected:
            raise ValueError(f"group_k_support needs {self.num_blocks_expected} radii, got {self.radii.numel()}")
        if not (self.radii > 0).all():
            raise ValueError("group_k_support radii must be positive")
        self._device_cache: dict[torch.device, list[list[dict[str, Tensor | int]]]] = {}

    @property
    def num_blocks_expected(self) -> int:
        return self.num_group_blocks + len(self.shapes)

    @classmethod
    def from_params(cls, groups: ZeroInvariantGroups, params: Sequence[Tensor], k: float | int,
                    radius_factor: float = 10.0, radius: float | None = None) -> "GroupKSupportBall":
        """Build with radii ``radius_factor * ||x_block||`` from the current tensors (or ``radius``)."""
        shapes = [tuple(p.shape) for p in params]
        probe = cls(groups, shapes, k, [1.0] * (len(groups.layer_blocks()[1]) + len(shapes)))
        if radius is not None:
            radii = [float(radius)] * probe.num_blocks
        else:
            norms = probe.block_sq(params).sqrt().tolist()
            radii = [radius_factor * _base_norm(n) for n in norms]
        probe.radii = torch.tensor(radii, dtype=torch.float64)
        return probe

    # -- vectorised pieces -----------------------------------------------------------------------
    def _on(self, device: torch.device) -> list[list[dict[str, Tensor | int]]]:
        cached = self._device_cache.get(device)
        if cached is None:
            cached = [[{key: (val.to(device) if isinstance(val, Tensor) else val) for key, val in e.items()}
                       for e in entries] for entries in self._slices]
            self._device_cache[device] = cached
        return cached

    @torch.no_grad()
    def _sq_parts(self, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Squared norms of every group's owned entries, and of every tensor's unowned rest."""
        device = tensors[0].device
        per_group = torch.zeros(self.num_groups, dtype=torch.float64, device=device)
        rest = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        for i, (t, entries) in enumerate(zip(tensors, self._on(device))):
            x = t.to(torch.promote_types(t.dtype, torch.float32))
            if not entries:
                rest[i] = torch.linalg.vector_norm(x).double().square()
                continue
            for e in entries:
                masked = x if e["prior"] is None else x * e["prior"]
                other = [d for d in range(t.dim()) if d != e["dim"]]
                # Norms per position, then float64: the rest below is a difference of sums.
                red = (torch.linalg.vector_norm(masked, 2, dim=other) if other else masked.abs()).double().square()
                per_group.index_add_(0, e["gid"], red[e["pos"]])
            # The rest lies in the last slice's region minus its owned positions.
            rest[i] = red.sum() - red[e["pos"]].sum()
        return per_group, rest.clamp(min=0)

    @torch.no_grad()
    def block_sq(self, tensors):
        return self._block_sums(*self._sq_parts(tensors))

    def _block_sums(self, per_group: Tensor, rest: Tensor) -> Tensor:
        blocks = torch.zeros(self.num_group_blocks, dtype=torch.float64, device=per_group.device)
        sel = self.group_block.to(per_group.device)
        mask = sel >= 0
        blocks.index_add_(0, sel[mask], per_group[mask])
        return torch.cat([blocks, rest]).cpu()

    def _field(self, per_group: Tensor, rest_value: Tensor, i: int, like: Tensor) -> Tensor:
        """Tensor ``i``'s entries get their owner group's value, unowned ones ``rest_value``."""
        entries = self._on(like.device)[i]
        field = rest_value.to(device=like.device, dtype=like.dtype).reshape(())
        for e in entries:
            vec = torch.zeros(self.shapes[i][e["dim"]], dtype=like.dtype, device=like.device)
            vec[e["pos"]] = per_group[e["gid"]].to(like.dtype)
            region = _vec_view(e["own"], e["dim"], like.dim())
            if e["prior"] is not None:
                region = region & e["prior"]
            field = torch.where(region, _vec_view(vec, e["dim"], like.dim()), field)
        return field

    def expand(self, values, i, like):
        values = values.to(like.device)
        blocks = self.group_block.to(like.device)
        per_group = torch.where(blocks >= 0, values[blocks.clamp(min=0)], torch.zeros((), dtype=values.dtype,
                                                                                     device=like.device))
        return self._field(per_group, values[self.num_group_blocks + i], i, like)

    def select_top_k(self, group_sq: Tensor) -> Tensor:
        """Mask of the K groups with the largest norms in every block (vectorised over blocks)."""
        device = group_sq.device
        blocks = self.group_block.to(device)
        in_block = (blocks >= 0).nonzero().flatten()
        order = in_block[torch.argsort(group_sq[in_block], descending=True, stable=True)]
        order = order[torch.argsort(blocks[order], stable=True)]          # by block, then by norm
        blk = blocks[order]
        rank = torch.arange(order.numel(), device=device) - self.block_start.to(device)[blk]
        chosen = torch.zeros(self.num_groups, dtype=torch.bool, device=device)
        chosen[order[rank < self.block_k.to(device)[blk]]] = True
        return chosen

    @torch.no_grad()
    def lmo(self, m, state=None):
        return self._lmo(m, *self._sq_parts(m))

    @torch.no_grad()
    def lmo_and_block_sq(self, m, state=None):
        per_group, rest = self._sq_parts(m)
        return self._lmo(m, per_group, rest), self._block_sums(per_group, rest)

    def _lmo(self, m: Sequence[Tensor], per_group: Tensor, rest: Tensor) -> list[Tensor]:
        device = per_group.device
        chosen = self.select_top_k(per_group)
        blocks = self.group_block.to(device)
        chosen_sq = torch.zeros(self.num_group_blocks, dtype=torch.float64, device=device)
        chosen_sq.index_add_(0, blocks[chosen], per_group[chosen])
        radii = self.radii.to(device)
        coef = torch.zeros_like(per_group)
        if self.num_group_blocks:
            block_coef = torch.where(chosen_sq > 0, -radii[:self.num_group_blocks] / chosen_sq.sqrt().clamp(min=1e-300),
                                     torch.zeros_like(chosen_sq))
            coef = torch.where(chosen, block_coef[blocks.clamp(min=0)], coef)
        rest_coef = torch.where(rest > 0, -radii[self.num_group_blocks:] / rest.sqrt().clamp(min=1e-300),
                                torch.zeros_like(rest))
        return [t * self._field(coef, rest_coef[i], i, t) for i, t in enumerate(m)]

    @torch.no_grad()
    def gauge(self, tensors):
        per_group, rest = self._sq_parts(tensors)
        norms = per_group.sqrt().cpu()
        out = torch.zeros(self.num_blocks, dtype=torch.float64)
        for b in range(self.num_group_blocks):                # checks only, not in the training step
            out[b] = k_support_norm(norms[self.group_block == b], int(self.block_k[b]))
        out[self.num_group_blocks:] = rest.sqrt().cpu()
        return out
