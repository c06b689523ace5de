"""OPQ allocation: the requested rate is met, as counted in the exported bytes, and bits go where
the closed forms say."""

import json
import math

import pytest
import torch
from torch import nn

import hf_oto
from hf_oto.methods.opq import (OPQAllocation, OPQConfig, allocate, compression_report, quantize,
                                safetensors_tensor_bytes, theory)
from hf_oto.testing.zoo import build

OPQ_TENSORS = ("codes", "mask", "scales", "codebook", "outlier_index", "outlier_value")


class Tower(nn.Module):
    """Linear layers whose weights differ in scale (and law), as in pretrained networks."""

    def __init__(self, scales=(0.01, 0.02, 0.04, 0.08), width: int = 96, laws=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in scales)
        g = torch.Generator().manual_seed(3)
        laws = laws or ["laplace"] * len(scales)
        with torch.no_grad():
            for layer, scale, law in zip(self.layers, scales, laws):
                if law == "laplace":
                    w = -torch.log(torch.rand(width, width, generator=g)) * (torch.rand(width, width, generator=g) < 0.5).mul(2).sub(1)
                else:
                    w = torch.randn(width, width, generator=g)
                layer.weight.copy_(w * scale)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("distribution", ["laplace", "gaussian", "auto"])
@pytest.mark.parametrize("strategy", ["opq", "uniform"])
def test_requested_rate_is_met_within_one_percent(distribution, strategy):
    models = [Tower(laws=["laplace", "gaussian", "laplace", "gaussian"]), build("bert-seq-cls")[0]]
    for model in models:
        for rate in (5.0, 8.0, 12.0):
            alloc = allocate(model, target_rate=rate, distribution=distribution, strategy=strategy)
            assert alloc.compression_rate == pytest.approx(rate, rel=0.01), (type(model).__name__, rate)
            assert alloc.bits_per_weight == pytest.approx(32 / rate, rel=0.01)


def _opq_bytes(tensors: dict[str, int], layer: str) -> int:
    return sum(tensors[f"{layer}.{name}"] for name in OPQ_TENSORS)


@pytest.mark.parametrize("name", ["bert-seq-cls", "tower"])
def test_exported_bytes_match_the_rate_definition(name, tmp_path):
    """rate = 32 N / sum(N [mask] + K b + C 16 + 2^b 32 + 48 outliers), checked on the file."""
    model = Tower() if name == "tower" else build(name)[0]
    alloc = allocate(model, target_rate=8.0, distribution="auto")
    small = quantize(model, allocation=alloc)
    hf_oto.save_pretrained(small, tmp_path)
    tensors = safetensors_tensor_bytes(tmp_path)
    total_bytes = 0
    for layer in alloc:
        on_disk = _opq_bytes(tensors, layer.name)
        mask_bytes = math.ceil(layer.numel / 8) if layer.has_mask else 0
        expected = (mask_bytes + math.ceil(layer.num_kept * layer.bits / 8) + layer.num_scales * layer.scale_bits // 8
                    + 4 * 2 ** layer.bits + 6 * layer.num_outliers)
        assert on_disk == expected, layer.name
        assert 0 <= 8 * on_disk - layer.storage_bits < 16  # only the byte padding of two packed tensors
        total_bytes += on_disk
    assert 32 * alloc.numel / (8 * total_bytes) == pytest.approx(8.0, rel=0.01)
    assert compression_report(small)["bytes"] == total_bytes
    assert compression_report(small)["storage_bits"] == alloc.storage_bits


def test_larger_weights_get_more_bits_and_less_pruning():
    alloc = allocate(Tower(scales=(0.01, 0.02, 0.04, 0.08, 0.16)), target_rate=8.0, distribution="laplace")
    per_weight = [layer.storage_bits / layer.numel for layer in alloc]
    bits = [layer.bits for layer in alloc]
    pruned = [layer.prune_ratio for layer in alloc]
    assert per_weight == sorted(per_weight) and per_weight[0] < per_weight[-1]
    assert bits == sorted(bits) and bits[0] < bits[-1]
    assert pruned == sorted(pruned, reverse=True)


def test_opq_beats_uniform_allocation_on_weight_error():
    model = Tower(scales=(0.01, 0.03, 0.05, 0.12), laws=["laplace", "gaussian", "gaussian", "laplace"], width=256)
    errors = {}
    for strategy in ("opq", "uniform"):
        alloc = allocate(model, target_rate=8.0, distribution="auto", strategy=strategy)
        small = quantize(model, allocation=alloc)
        with torch.no_grad():
            realised = sum(float((model.get_submodule(l.name).weight - small.get_submodule(l.name).weight).pow(2).sum())
                           for l in alloc)
        # The law's clipped tail is a little heavier than that of a finite sample: the prediction
        # errs on the high side.
        assert 0.85 * alloc.predicted_sse < realised < 1.02 * alloc.predicted_sse
        errors[strategy] = realised
    assert errors["opq"] < 0.8 * errors["uniform"]


def test_laplace_layers_sit_at_the_closed_form_threshold():
    """t^2 = q(b) + lam b / sigma2 for every pruning layer but the one that absorbs the rounding."""
    model = Tower(scales=tuple(0.01 * 1.5 ** i for i in range(8)))
    alloc = allocate(model, target_rate=10.0, distribution="laplace")
    off = 0
    for layer in alloc:
        if not layer.has_mask:
            continue
        closed = float(theory.kept_error("laplace", layer.bits)) + alloc.multiplier * layer.bits / layer.sigma2
        off += abs(layer.threshold ** 2 / closed - 1) > 1e-6
        # The mask prunes what the fitted law says the threshold prunes.
        assert layer.prune_ratio == pytest.approx(1 - math.exp(-layer.threshold), abs=1.0 / layer.numel)
    assert off <= 1


def test_fixed_bit_width_allocates_pruning_only():
    alloc = allocate(Tower(), target_rate=10.0, min_bits=4, max_bits=4)
    assert {layer.bits for layer in alloc} == {4}
    assert alloc.compression_rate == pytest.approx(10.0, rel=0.01)
    assert len({round(layer.prune_ratio, 3) for layer in alloc}) > 1  # ratios still differ per layer


def test_without_pruning_no_mask_and_rate_at_least_the_target():
    alloc = allocate(Tower(), target_rate=7.0, prune=False)
    assert not any(layer.has_mask for layer in alloc)
    assert all(layer.num_kept == layer.numel for layer in alloc)
    assert alloc.compression_rate >= 7.0 * (1 - 1e-9)


def test_outliers_are_counted_and_kept_exactly():
    model = Tower(scales=(0.02, 0.02))
    with torch.no_grad():
        model.layers[1].weight[5, 7] = 3.0  # 150 times the scale: far beyond any Laplace draw
        model.layers[1].weight[9, 1] = -2.0
    alloc = allocate(model, target_rate=8.0)
    assert alloc["layers.1"].num_outliers >= 2
    small = quantize(model, allocation=alloc)
    weight = small.layers[1].weight
    assert float(weight[5, 7]) == float(torch.tensor(3.0).half())
    assert float(weight[9, 1]) == float(torch.tensor(-2.0).half())
    without = quantize(model, target_rate=8.0, outliers=False)
    assert abs(float(without.layers[1].weight[5, 7]) - 3.0) > 1.0  # clipped to the codebook's range


def test_allocation_serialises_to_json():
    alloc = allocate(Tower(), target_rate=9.0, distribution="auto", exclude=("layers.0",))
    again = OPQAllocation.from_dict(json.loads(alloc.to_json()))
    assert again.to_dict() == alloc.to_dict()
    assert again.compression_rate == alloc.compression_rate
    assert "layers.0" in alloc.skipped and "layers.0" not in {layer.name for layer in alloc}
    assert "rate 9.000x" in alloc.summary()


def test_tied_and_excluded_layers_are_skipped():
    model, _ = build("gpt2")
    alloc = allocate(model, target_rate=8.0)
    assert "lm_head" in alloc.skipped and "tied" in alloc.skipped["lm_head"]
    assert {layer.kind for layer in alloc} == {"conv1d_hf"}
    with_embeddings = allocate(model, target_rate=8.0, layer_types=("linear", "embedding"))
    assert "transformer.wpe" in {layer.name for layer in with_embeddings}
    assert "transformer.wte" in with_embeddings.skipped  # tied to lm_head


@pytest.mark.parametrize("options, message", [
    ({"target_rate": 1.0}, "target_rate"),
    ({"target_rate": "8"}, "target_rate"),
    ({"target_rate": 200.0}, "out of reach.*achievable"),
    ({"target_rate": 2.0}, "out of reach.*achievable"),
    ({"distribution": "cauchy"}, "distribution"),
    ({"min_bits": 0}, "min_bits"),
    ({"min_bits": 5, "max_bits": 4}, "min_bits"),
    ({"max_bits": 9}, "max_bits"),
    ({"max_prune": 1.0}, "max_prune"),
    ({"layer_types": ("lstm",)}, "layer_types"),
    ({"exclude": ("(",)}, "regular expression"),
    ({"strategy": "greedy"}, "strategy"),
    ({"exclude": ("layers",)}, "no layer"),
    ({"bogus": 1}, "unknown OPQ options"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        allocate(Tower(), OPQConfig.from_dict({"target_rate": 8.0, **options}))


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer"):
        allocate(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), target_rate=8.0)
