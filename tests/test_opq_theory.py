"""OPQ closed forms against Monte-Carlo samples, and the stationarity conditions they lead to."""

import math

import pytest
import torch
from torch import nn

from hf_oto.methods.opq import allocate, build_quantizer, theory
from hf_oto.methods.opq.theory import FAMILIES


def standard_samples(family: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "laplace":
        magnitude = -torch.log(torch.rand(n, generator=g, dtype=torch.float64))
        sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return magnitude * sign
    return torch.randn(n, generator=g, dtype=torch.float64)


def quantize_reference(u: torch.Tensor, t: float, step: float, bits: int) -> torch.Tensor:
    """An independent implementation of the sign-magnitude quantizer starting at ``t``."""
    levels = 2 ** (bits - 1)
    j = torch.clamp(torch.floor((u.abs() - t) / step), 0, levels - 1)
    q = torch.sign(u) * (t + (j + 0.5) * step)
    return torch.where(u.abs() >= t, q, torch.zeros_like(u))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_closed_form_matches_samples(family):
    u = standard_samples(family, 400_000, seed=1)
    for t in (0.1, 0.5, 1.0, 2.0):
        pruned = u.abs() < t
        assert abs(float(pruned.double().mean()) - float(1 - theory.kept_fraction(family, t))) < 3e-3
        empirical = float((u * u * pruned).mean())
        assert empirical == pytest.approx(float(theory.pruning_error(family, t)), rel=0.03), (family, t)
    # Pruning everything costs the whole variance (1 for N(0,1), 2 for the standard Laplace).
    assert float(theory.pruning_error(family, math.inf)) == pytest.approx(1.0 if family == "gaussian" else 2.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_closed_form_matches_samples(family, bits):
    """Exact expectations, at 1-2 bits too (where step^2/12 is far off) and with clipping."""
    u = standard_samples(family, 1_000_000, seed=bits)
    for t in (0.0, 0.8):
        # Around the best step, from clipping- to granular-dominated (at 8 bits, 0.7 would clip
        # too few samples for a sharp check).
        for factor in (0.7, 1.0, 1.5) if bits < 8 else (1.0, 1.5):
            step = float(theory.optimal_step(family, bits, t)) * factor
            kept = u.abs() >= t
            per_weight = (u - quantize_reference(u, t, step, bits)) ** 2 * kept
            predicted = float(theory.quantization_error(family, t, step, bits))
            # Rare clipped weights make the sample mean noisy: allow 4 standard errors.
            stderr = float(per_weight.std()) / math.sqrt(per_weight.numel())
            assert abs(float(per_weight.mean()) - predicted) < 4 * stderr + 1e-3 * predicted, (family, bits, t, factor)
            if bits <= 4:  # sharp enough to tell the exact error from step^2/12 at 1-2 bits (7-40% apart)
                assert 4 * stderr < 0.1 * predicted
    # Without clipping and with many levels, the classic step^2/12 per kept weight appears.
    fine = float(theory.quantization_error(family, 0.5, 1e-3, 16))
    assert fine == pytest.approx(float(theory.kept_fraction(family, 0.5)) * 1e-6 / 12, rel=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimal_step_minimises_the_error(family):
    for bits in (1, 2, 4, 8):
        for t in (0.0, 1.3):
            step = float(theory.optimal_step(family, bits, t))
            best = float(theory.quantization_error(family, t, step, bits))
            for factor in (0.97, 1.03, 0.8, 1.25):
                assert best <= float(theory.quantization_error(family, t, step * factor, bits))


def test_laplace_is_memoryless_gaussian_is_not():
    ts = torch.tensor([0.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    for bits in (2, 5):
        lap_step = theory.optimal_step("laplace", bits, ts)
        assert torch.allclose(lap_step, lap_step[0].expand(4))
        # Per kept weight, the exact error at any t equals the t-independent q(bits).
        per_kept = theory.quantization_error("laplace", ts, lap_step, bits) / theory.kept_fraction("laplace", ts)
        assert torch.allclose(per_kept, theory.kept_error("laplace", bits, ts), rtol=1e-9)
        gauss = theory.kept_error("gaussian", bits, ts)
        assert bool((gauss[1:] < gauss[:-1]).all())  # the Gaussian tail narrows: less error per kept weight
    assert float(theory.kept_error("laplace", 1)) == pytest.approx(1.0)  # one level: Var Exp(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_stationary_threshold_minimises_the_lagrangian(family):
    """t* from the closed form minimises D_p(t) + k(t) (q(b, t) + mu b) over t."""
    grid = torch.linspace(0.0, 3.5, 7001, dtype=torch.float64)
    for bits in (2, 4, 6):
        for mu in (1e-4, 0.01, 0.2):
            t_star = float(theory.stationary_threshold(family, bits, mu * bits))
            k = theory.kept_fraction(family, grid)
            lagrangian = theory.pruning_error(family, grid) + k * (theory.kept_error(family, bits, grid) + mu * bits)
            assert t_star == pytest.approx(float(grid[lagrangian.argmin()]), abs=0.01), (bits, mu)
            if family == "laplace":
                assert t_star ** 2 == pytest.approx(float(theory.kept_error("laplace", bits)) + mu * bits, rel=1e-9)


def test_outlier_threshold_is_exceeded_once_on_average():
    for family in FAMILIES:
        for n in (1000, 10 ** 6):
            x = theory.outlier_threshold(family, n)
            assert float(theory.kept_fraction(family, x)) * n == pytest.approx(1.0, rel=1e-6)
    assert theory.outlier_threshold("laplace", 1000) == pytest.approx(math.log(1000))


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rate", [6.0, 12.0])
def test_layer_error_matches_the_prediction(family, rate):
    """Synthetic layer with per-channel scales: the realised squared error of the quantizer equals
    the allocation's closed-form prediction (fit, pruning and quantization together)."""
    rows, cols = 96, 2048
    scales = torch.logspace(-2, -0.5, rows, dtype=torch.float64)[:, None]
    weight = (standard_samples(family, rows * cols, seed=7).view(rows, cols) * scales).float()
    model = OneLayer(weight)
    alloc = allocate(model, target_rate=rate, distribution=family)
    layer = alloc["fc"]
    quantizer = build_quantizer(model.fc.weight, layer)
    realised = float((quantizer.quantized(model.fc.weight) - weight).double().pow(2).mean())
    assert realised == pytest.approx(layer.predicted_mse, rel=0.05)
    assert layer.num_outliers <= 6  # draws from the law itself: about one beyond the threshold
    assert alloc.compression_rate == pytest.approx(rate, rel=0.01)
