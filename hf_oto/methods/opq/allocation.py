"""Analytic per-layer allocation of pruning ratios and bit widths for a global compression rate.

**Storage and compression rate.** A quantized layer with ``N`` weights, ``K`` of them kept, ``b``
bits, ``C`` scales stores

    bits_l = N * [mask stored] + K * b + C * scale_bits + 2**b * 32 + O * 48

(the 1-bit-per-weight pruning mask, present only when the layer prunes; ``b``-bit codes of the
kept weights; one fp16 scale per output channel, 16 bits, or fp32 where a scale does not fit in
fp16; the float32 codebook; ``O`` outliers, each an int32 position and an fp16 value).

**Outliers.** Transformer weights have a few entries far beyond any fitted law (FFN output
layers of MiniLM: up to 168 times the mean magnitude); clipping them to the codebook's range
wrecks the model. A weight whose normalized magnitude exceeds
:func:`.theory.outlier_threshold` (the level that ``N`` draws from the law exceed once on
average) is stored exactly instead. Their number depends only on the weights and the fit, not on
the allocation, so they enter the budget as a fixed per-layer cost. The compression rate of a set of layers is
``32 * sum(N) / sum(bits_l)``; bits per weight is ``sum(bits_l) / sum(N)``. Biases and layers that
are not quantized stay float32 and are not part of the rate (reported separately as bytes on
disk). The exported tensors hold exactly these bits, each packed tensor rounded up to whole bytes.

**Allocation.** Each layer is fitted (normalized units, see :mod:`.theory`) and has scale energy
``sigma2 = mean_c s_c^2``, so its squared weight error is ``sigma2 * N * E`` with ``E`` the
normalized error. For a Lagrange multiplier ``lam`` every layer minimises independently

    sigma2 * N * [D_p(t) + k(t) q(b, t)] + lam * bits_l(b, t)

over its threshold ``t`` and width ``b``. For each ``b`` the threshold has the closed form of
:func:`.theory.stationary_threshold` with ``mu = lam / sigma2`` (Laplace:
``t = sqrt(q(b) + mu b)``), and the layer keeps the cheapest of the ``2 * (#widths)`` candidates
(each width with the stationary mask, or without any mask). The total bits decrease monotonically
with ``lam``, so bisection on ``log lam`` finds the multiplier where they cross the budget.
Because widths are integers the total jumps there, where a layer (or several equal ones) changes
candidate: those layers switch one by one while the budget allows, then the single layer whose
masked candidate (any width) spending exactly the bits left lowers the error most takes it (if
every such candidate raises the error, it is used only when the rate would otherwise be more than
0.5% above the target). The requested rate is thus met within 0.5%, usually up to rounding to
whole weights. No data, no iteration over allocations: one scalar root find plus closed forms.

Layers with larger weights (larger ``sigma2``) get more bits and less pruning: the multiplier
equalises the marginal error per bit across layers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ...compress.core import is_gpt2_conv1d
from ...compress.hf_oto_layers_opq import channel_scales, storage_bits
from . import theory
from .config import OPQConfig

FP16_MIN_NORMAL = 6.2e-5
FP16_MAX = 6.5e4


# -- layers ------------------------------------------------------------------------------------------

def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_hf"``, ``"conv"``, ``"embedding"`` or ``None`` (unsupported).

    Exact classes only: subclasses may use their weight in ways a replacement would not reproduce.
    """
    if type(module) is nn.Linear:
        return "linear"
    if is_gpt2_conv1d(module) and type(module).__module__.startswith("transformers"):
        return "conv1d_hf"
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


_CATEGORY = {"linear": "linear", "conv1d_hf": "linear", "conv": "conv", "embedding": "embedding"}
CHANNEL_DIM = {"linear": 0, "conv1d_hf": 1, "conv": 0, "embedding": 0}


def quantizable_layers(model: nn.Module, config: OPQConfig) -> tuple[list[tuple[str, nn.Module, str]], dict[str, str]]:
    """The layers OPQ will quantize, ``(name, module, kind)``, and the skipped ones with reasons.

    Example:
        >>> layers, skipped = quantizable_layers(gpt2, OPQConfig())    # doctest: +SKIP
        >>> skipped["lm_head"]                                         # doctest: +SKIP
        'weight shared with transformer.wte.weight (tied weights are not quantized)'
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            plist = getattr(getattr(module, "parametrizations", None), "weight", None)
            if plist is not None and any(type(p).__name__ == "OPQQuantizer" for p in plist):
                raise ValueError(f"module {name!r} already has an OPQ quantizer: allocate on the model "
                                 "before attach_quantizers")
            if plist is not None:
                skipped[name] = "its weight is parametrized"
            continue
        if _CATEGORY[kind] not in config.layer_types:
            continue
        pattern = next((p for p in config.exclude if re.search(p, name)), None)
        if pattern is not None:
            skipped[name] = f"excluded by {pattern!r}"
            continue
        weight = module.weight
        sharers = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if sharers:
            skipped[name] = f"weight shared with {sharers[0]} (tied weights are not quantized)"
            continue
        if kind == "embedding" and module.max_norm is not None:
            skipped[name] = "embedding with max_norm (renormalises its weight in place)"
            continue
        if not weight.is_floating_point() or weight.numel() == 0:
            skipped[name] = "weight is not a non-empty floating-point tensor"
            continue
        chosen.append((name, module, kind))
    return chosen, skipped


# -- fit -----------------------------------------------------------------------------------------------

def channel_rows(weight: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The weight as ``(channels, weights per channel)``, float32."""
    return weight.detach().float().movedim(channel_dim, 0).reshape(weight.shape[channel_dim], -1)


def fit_scales(weight: torch.Tensor, channel_dim: int, family: str, per_channel: bool = True) -> torch.Tensor:
    """Zero-mean maximum-likelihood scale of each channel (or of the whole layer), as stored.

    Laplace: ``mean |w|``; Gaussian: ``sqrt(mean w^2)``. Rounded to float16 when every scale is
    zero or a normal fp16 number, else float32; the stored dtype is the returned dtype.
    """
    rows = channel_rows(weight, channel_dim)
    if not per_channel:
        rows = rows.reshape(1, -1)
    scales = rows.abs().mean(1) if family == "laplace" else rows.pow(2).mean(1).sqrt()
    nonzero = scales[scales > 0]
    if nonzero.numel() == 0 or (float(nonzero.min()) >= FP16_MIN_NORMAL and float(nonzero.max()) <= FP16_MAX):
        return scales.to(torch.float16)
    return scales


def normalized_weight(weight: torch.Tensor, channel_dim: int, scales: torch.Tensor) -> torch.Tensor:
    """``w / s_c`` in float32, in the weight's shape. All-zero channels have scale 0: any code
    times 0 is 0, so they are divided by 1 instead."""
    s = channel_scales(scales, weight.dim(), channel_dim)
    return weight.detach().float() / torch.where(s == 0, torch.ones_like(s), s)


def normalized_magnitudes(weight: torch.Tensor, channel_dim: int, scales: torch.Tensor) -> torch.Tensor:
    """``|w| / s_c`` in the weight's shape (0 where a channel's scale is 0)."""
    return normalized_weight(weight, channel_dim, scales).abs()


def count_outliers(weight: torch.Tensor, channel_dim: int, family: str, scales: torch.Tensor) -> int:
    """Weights whose normalized magnitude exceeds :func:`.theory.outlier_threshold`."""
    limit = theory.outlier_threshold(family, weight.numel())
    return int((normalized_magnitudes(weight, channel_dim, scales) > limit).sum())


def choose_family(weight: torch.Tensor, channel_dim: int, per_channel: bool = True) -> str:
    """The law (Laplace or Gaussian) with the higher mean log-likelihood of the weights."""
    rows = channel_rows(weight, channel_dim)
    if not per_channel:
        rows = rows.reshape(1, -1)
    lap = rows.abs().mean(1, keepdim=True)
    gau = rows.pow(2).mean(1, keepdim=True).sqrt()
    ok = (lap > 0).squeeze(1)
    if not ok.any():
        return "laplace"
    rows, lap, gau = rows[ok], lap[ok], gau[ok]
    ll_lap = (-math.log(2.0) - lap.log() - rows.abs() / lap).mean()
    ll_gau = (-0.5 * math.log(2 * math.pi) - gau.log() - rows.pow(2) / (2 * gau.pow(2))).mean()
    return "laplace" if ll_lap >= ll_gau else "gaussian"


# -- allocation records -------------------------------------------------------------------------------

@dataclass
class LayerAllocation:
    """One layer's share of the budget.

    Attributes:
        name, kind, shape: the module path, its kind (see :func:`layer_kind`) and weight shape.
        family: the fitted law; sigma2: mean squared channel scale (raw units).
        bits: width of the kept weights' codes; num_kept: weights kept (the rest pruned);
        has_mask: whether the layer stores a pruning mask (False: every weight kept).
        threshold: the modelled pruning threshold in normalized units.
        num_scales, scale_bits: scales stored and their width (16 or 32).
        predicted_mse: modelled mean squared weight error per weight, raw units.
        num_outliers: weights beyond the law stored exactly (int32 position + fp16 value).
    """

    name: str
    kind: str
    shape: list[int]
    family: str
    sigma2: float
    bits: int
    num_kept: int
    has_mask: bool
    threshold: float
    num_scales: int
    scale_bits: int
    predicted_mse: float
    num_outliers: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channel_dim(self) -> int:
        return CHANNEL_DIM[self.kind]

    @property
    def prune_ratio(self) -> float:
        return 1.0 - self.num_kept / self.numel

    @property
    def storage_bits(self) -> int:
        """Bits stored for this weight (see the module doc for the definition)."""
        return storage_bits(self.numel, self.num_kept, self.bits, self.has_mask,
                            self.num_scales * self.scale_bits, self.num_outliers)


@dataclass
class OPQAllocation:
    """Pruning ratio and bit width of every quantized layer, with the totals.

    Example:
        >>> alloc = allocate(model, target_rate=8)          # doctest: +SKIP
        >>> print(alloc.summary())                          # doctest: +SKIP
        >>> alloc.compression_rate                          # doctest: +SKIP
        8.0
    """

    config: OPQConfig
    layers: list[LayerAllocation]
    multiplier: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerAllocation]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerAllocation:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def storage_bits(self) -> int:
        return sum(layer.storage_bits for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.numel

    @property
    def compression_rate(self) -> float:
        """``32 * weights / storage bits`` over the quantized layers."""
        return 32.0 * self.numel / self.storage_bits

    @property
    def prune_ratio(self) -> float:
        return 1.0 - sum(layer.num_kept for layer in self.layers) / self.numel

    @property
    def predicted_sse(self) -> float:
        """Modelled total squared weight error (raw units)."""
        return sum(layer.predicted_mse * layer.numel for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "multiplier": self.multiplier, "skipped": dict(self.skipped),
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OPQAllocation":
        return cls(config=OPQConfig.from_dict(d["config"]), multiplier=float(d.get("multiplier", 0.0)),
                   skipped=dict(d.get("skipped", {})), layers=[LayerAllocation(**x) for x in d["layers"]])

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def summary(self) -> str:
        """A table: one row per layer (law, bits, pruned %, bits per weight) and the totals."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'law':<8} {'bits':>4} {'pruned':>7} {'bits/w':>7} {'weights':>9}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {layer.family:<8} {layer.bits:>4} {100 * layer.prune_ratio:>6.1f}% "
                         f"{layer.storage_bits / layer.numel:>7.3f} {layer.numel:>9}")
        lines.append(f"{'total':<{width}}  {'':<8} {'':>4} {100 * self.prune_ratio:>6.1f}% "
                     f"{self.bits_per_weight:>7.3f} {self.numel:>9}   rate {self.compression_rate:.3f}x "
                     f"(target {self.config.target_rate}x, strategy {self.config.strategy})")
        return "\n".join(lines)


# -- the optimisation ---------------------------------------------------------------------------------

@dataclass
class _Stats:
    """Per-layer tensors (float64) the allocation works on."""

    numel: torch.Tensor
    sigma2: torch.Tensor
    overhead: torch.Tensor  # scale and outlier bits (the codebook depends on b: added per candidate)
    laplace: torch.Tensor   # bool: family is Laplace
    t_max: torch.Tensor


def _per_family(stats: _Stats, fn) -> torch.Tensor:
    """``fn(family, index)`` evaluated for the layers of each law, merged."""
    out = None
    for family, select in (("laplace", stats.laplace), ("gaussian", ~stats.laplace)):
        if not select.any():
            continue
        value = fn(family)
        out = value if out is None else torch.where(select, value, out)
    return out


def _mask_candidate(stats: _Stats, lam: float, bits: int, t: torch.Tensor | None = None):
    """Error, bits and threshold of every layer at width ``bits`` with the stationary mask."""
    if t is None:
        t = _per_family(stats, lambda f: theory.stationary_threshold(f, bits, lam * bits / stats.sigma2))
        t = torch.minimum(t, stats.t_max)
    kept = _per_family(stats, lambda f: theory.kept_fraction(f, t))
    err = _per_family(stats, lambda f: theory.pruning_error(f, t) + theory.kept_fraction(f, t) * theory.kept_error(f, bits, t))
    sse = stats.sigma2 * stats.numel * err
    cost = stats.numel * (1.0 + kept * bits) + stats.overhead + 32.0 * 2 ** bits
    return sse, cost, t


def _plain_candidate(stats: _Stats, bits: int):
    err = _per_family(stats, lambda f: theory.kept_error(f, bits, torch.zeros_like(stats.sigma2)))
    sse = stats.sigma2 * stats.numel * err
    cost = stats.numel * bits + stats.overhead + 32.0 * 2 ** bits
    return sse, cost, torch.zeros_like(stats.sigma2)


def _choose(stats: _Stats, lam: float, widths: list[int], prune: bool):
    """Every layer's cheapest candidate ``(bits, masked)`` for multiplier ``lam``."""
    sses, costs, ts, labels = [], [], [], []
    for b in widths:
        options = [(True, _mask_candidate(stats, lam, b))] if prune else []
        options.append((False, _plain_candidate(stats, b)))
        for masked, (sse, cost, t) in options:
            sses.append(sse)
            costs.append(cost)
            ts.append(t)
            labels.append((b, masked))
    sse, cost, t = torch.stack(sses, 1), torch.stack(costs, 1), torch.stack(ts, 1)
    best = (sse + lam * cost).argmin(1)
    rows = torch.arange(len(best))
    return [labels[i] for i in best.tolist()], sse[rows, best], cost[rows, best], t[rows, best]


def _bisect(fn, lo: float, hi: float, budget: float, iters: int = 64) -> tuple[float, float]:
    """``(lam_lo, lam_hi)`` around where the non-increasing ``fn(lam)`` crosses ``budget``
    (``fn(lam_hi) <= budget < fn(lam_lo)``), bisecting on ``log lam``."""
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = (a + b) / 2
        if fn(math.exp(mid)) > budget:
            a = mid
        else:
            b = mid
    return math.exp(a), math.exp(b)


def _layer_stats(layers: list[tuple[str, nn.Module, str]], config: OPQConfig):
    records, sigma2, numel, overhead, laplace, t_max = [], [], [], [], [], []
    for name, module, kind in layers:
        weight = module.weight
        cdim = CHANNEL_DIM[kind]
        family = config.distribution
        if family == "auto":
            family = choose_family(weight, cdim, config.channel_scales)
        stored = fit_scales(weight, cdim, family, config.channel_scales)
        scales = stored.double()
        outliers = count_outliers(weight, cdim, family, stored) if config.outliers else 0
        scale_bits = stored.element_size() * 8
        records.append((name, kind, list(weight.shape), family, scales.numel(), scale_bits, outliers))
        sigma2.append(float(scales.pow(2).mean()))
        numel.append(weight.numel())
        overhead.append(scales.numel() * scale_bits + 48 * outliers)
        laplace.append(family == "laplace")
        cap = float(theory.threshold_for_ratio(family, config.max_prune))
        t_max.append(min(cap, theory.GAUSSIAN_T_MAX) if family == "gaussian" else cap)
    # A layer whose weights are all zero has nothing to lose: give it a tiny energy instead of 0.
    s2 = torch.tensor(sigma2, dtype=torch.float64)
    floor = float(s2[s2 > 0].min()) * 1e-6 if (s2 > 0).any() else 1.0
    stats = _Stats(numel=torch.tensor(numel, dtype=torch.float64), sigma2=s2.clamp(min=floor),
                   overhead=torch.tensor(overhead, dtype=torch.float64),
                   laplace=torch.tensor(laplace, dtype=torch.bool), t_max=torch.tensor(t_max, dtype=torch.float64))
    return records, stats


def _records_to_layers(records, stats: _Stats, choice, sse, t) -> list[LayerAllocation]:
    out = []
    for i, (name, kind, shape, family, num_scales, scale_bits, outliers) in enumerate(records):
        bits, masked = choice[i]
        numel = math.prod(shape)
        kept = numel
        if masked:
            kept = numel - int(round(float(1.0 - theory.kept_fraction(family, t[i])) * numel))
        out.append(LayerAllocation(
            name=name, kind=kind, shape=shape, family=family, sigma2=float(stats.sigma2[i]), bits=int(bits),
            num_kept=int(kept), has_mask=bool(masked), threshold=float(t[i]) if masked else 0.0,
            num_scales=int(num_scales), scale_bits=int(scale_bits),
            predicted_mse=float(sse[i]) / numel, num_outliers=int(outliers)))
    return out


def allocate(model: nn.Module, config: OPQConfig | None = None, **kwargs: Any) -> OPQAllocation:
    """Per-layer bit widths and pruning ratios for ``config.target_rate``, from the weights only.

    Fits each layer, then solves the Lagrangian problem described in the module doc (or, with
    ``strategy="uniform"``, picks one width and ratio for all layers). Raises ``ValueError`` when
    the target cannot be met with the allowed widths and pruning ratios (the message gives the
    achievable range) or when the model has no supported layer.

    Example:
        >>> alloc = allocate(model, target_rate=10, distribution="auto")     # doctest: +SKIP
        >>> [(l.name, l.bits, round(l.prune_ratio, 2)) for l in alloc][:2]   # doctest: +SKIP
        [('bert.encoder.layer.0.attention.self.query', 3, 0.41), ...]
    """
    config = OPQConfig.from_options(config, **kwargs)
    layers, skipped = quantizable_layers(model, config)
    if not layers:
        raise ValueError(f"no layer of types {config.layer_types} to quantize in {type(model).__name__}"
                         + (f" (skipped: {skipped})" if skipped else ""))
    records, stats = _layer_stats(layers, config)
    budget = 32.0 * float(stats.numel.sum()) / config.target_rate
    widths = list(range(config.min_bits, config.max_bits + 1))
    if config.strategy == "uniform":
        choice, sse, t, lam = _uniform(records, stats, widths, budget, config)
    else:
        choice, sse, t, lam = _lagrangian(stats, widths, budget, config)
    alloc = OPQAllocation(config=config, layers=_records_to_layers(records, stats, choice, sse, t),
                          multiplier=lam, skipped=skipped)
    return alloc


def _achievable(cost_min: float, cost_max: float, numel: float) -> str:
    return f"{32 * numel / cost_max:.3f}x to {32 * numel / cost_min:.3f}x"


def _lagrangian(stats: _Stats, widths: list[int], budget: float, config: OPQConfig):
    def total(lam: float) -> float:
        return float(_choose(stats, lam, widths, config.prune)[2].sum())

    lam_min = float(stats.sigma2.min()) * 1e-12
    lam_max = float(stats.sigma2.max()) * 1e6
    cost_max, cost_min = total(lam_min), total(lam_max)
    n = float(stats.numel.sum())
    if not cost_min * (1 - 1e-9) <= budget <= cost_max * (1 + 1e-9):
        raise ValueError(f"target_rate {config.target_rate} is out of reach for these layers with bits in "
                         f"[{config.min_bits}, {config.max_bits}] and max_prune {config.max_prune}: "
                         f"achievable {_achievable(cost_min, cost_max, n)}")
    lam_lo, lam_hi = _bisect(total, lam_min, lam_max, budget)
    choice, sse, cost, t = _choose(stats, lam_hi, widths, config.prune)
    choice_lo, sse_lo, cost_lo, t_lo = _choose(stats, lam_lo, widths, config.prune)
    # Integer widths make the total jump where layers switch candidate (between lam_lo and
    # lam_hi). Switch them one by one while the budget allows; then the one layer whose masked
    # candidate (any width) spending exactly the bits left lowers the error most takes it.
    spent = float(cost.sum())
    for i in [i for i in range(len(choice)) if choice[i] != choice_lo[i]]:
        if spent - float(cost[i]) + float(cost_lo[i]) <= budget:
            spent += float(cost_lo[i] - cost[i])
            choice[i], sse[i], cost[i], t[i] = choice_lo[i], sse_lo[i], cost_lo[i], t_lo[i]
    left = budget - spent
    if config.prune and left > 0:
        fills = [(j, _fill(stats, j, float(cost[j]) + left, widths, config)) for j in range(len(choice))]
        fills = [(float(sse[j]) - f[1], j, f) for j, f in fills if f is not None]
        gain, j, (c, e, tj) = max(fills, key=lambda x: x[0]) if fills else (0.0, -1, (None, 0.0, None))
        # Spending the last bits can raise the error (a layer without mask would have to start
        # pruning); then keep the cheaper allocation unless it misses the rate by over 0.5%.
        if j >= 0 and (gain >= 0 or left > 0.005 * budget):
            choice[j], sse[j], t[j] = c, e, tj
    return choice, sse, t, lam_hi


def _fill(stats: _Stats, i: int, bits_left: float, widths: list[int], config: OPQConfig):
    """Layer ``i``'s masked candidate of least error that costs exactly ``bits_left``."""
    n = float(stats.numel[i])
    family = "laplace" if bool(stats.laplace[i]) else "gaussian"
    best = None
    for b in widths:
        kept = (bits_left - float(stats.overhead[i]) - 32.0 * 2 ** b - n) / (b * n)
        if not (1.0 - config.max_prune) <= kept <= 1.0:
            continue
        t = theory.threshold_for_ratio(family, 1.0 - kept)
        err = theory.pruning_error(family, t) + kept * theory.kept_error(family, b, t)
        sse = float(stats.sigma2[i]) * n * float(err)
        if best is None or sse < best[1]:
            best = ((b, True), sse, t)
    return best


def _uniform(records, stats: _Stats, widths: list[int], budget: float, config: OPQConfig):
    """The best single ``(bits, pruning ratio)`` for all layers that meets the budget exactly."""
    n = float(stats.numel.sum())
    best = None
    for b in widths:
        fixed_cost = float((stats.overhead + 32.0 * 2 ** b).sum())
        kept = (budget - fixed_cost - n) / (b * n) if config.prune else None
        if kept is None or not (1.0 - config.max_prune) <= kept <= 1.0:
            continue
        ratio = torch.full_like(stats.sigma2, 1.0 - kept)
        t = _per_family(stats, lambda f: theory.threshold_for_ratio(f, ratio))
        sse, _, _ = _mask_candidate(stats, 0.0, b, t=t)
        if best is None or float(sse.sum()) < best[0]:
            best = (float(sse.sum()), b, sse, t)
    if best is None:
        raise ValueError(f"no single bit width in [{config.min_bits}, {config.max_bits}] with a pruning ratio "
                         f"<= {config.max_prune} meets target_rate {config.target_rate} (uniform strategy"
                         + ("" if config.prune else ", prune=False") + ")")
    _, b, sse, t = best
    return [(b, True)] * len(records), sse, t, 0.0
