"""DSP layers: each converted layer equals the dense layer with its pruned blocks zeroed."""

import pytest
import torch
from torch import nn

from hf_oto.compress.hf_oto_layers import LAYER_TYPES
from hf_oto.compress.hf_oto_layers_dsp import DSPConv, DSPLinear
from hf_oto.methods.dsp import build_layer, plan_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_structure(layer: nn.Module, groups: int, keep: float, seed: int) -> torch.Tensor:
    """Random filter groups; each group keeps a random subset of input channels (zeros elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    n, c = layer.weight.shape[:2]
    assignment = torch.randint(0, groups, (n,), generator=gen)
    kept = torch.rand(groups, c, generator=gen) < keep
    mask = kept[assignment].float().view(n, c, *([1] * (layer.weight.dim() - 2)))
    with torch.no_grad():
        layer.weight.mul_(mask)
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(generator=gen)
    return assignment


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


CONVS = [
    (nn.Conv1d(12, 10, 3, padding=1), (2, 12, 9)),
    (nn.Conv2d(12, 10, 3, stride=2, padding=1, bias=False), (2, 12, 9, 9)),
    (nn.Conv2d(12, 10, (3, 1), dilation=2, padding="same"), (2, 12, 9, 7)),
    (nn.Conv2d(12, 10, 3, padding=1, padding_mode="reflect"), (2, 12, 8, 8)),
    (nn.Conv2d(12, 10, 3, padding=1), (12, 8, 8)),  # unbatched input
    (nn.Conv3d(12, 10, 2, padding=1), (1, 12, 4, 5, 3)),
    (nn.Linear(12, 10), (2, 5, 12)),
    (nn.Linear(12, 10, bias=False), (3, 12)),
]


@pytest.mark.parametrize("mode", ["split", "grouped"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_layer_matches_masked_dense(case, mode):
    torch.manual_seed(case)
    layer, shape = CONVS[case]
    assignment = _random_structure(layer, groups=3, keep=0.5, seed=case)
    x = torch.randn(shape)
    plan = plan_layer("layer", layer.weight, assignment)
    new, used, fraction = build_layer(layer, plan, mode)
    assert used == mode if len(plan.filters) > 1 else used == "split"
    assert isinstance(new, DSPLinear if isinstance(layer, nn.Linear) else DSPConv)
    with torch.no_grad():
        assert _relative(layer(x), new(x)) < 1e-6
    # Split runs exactly the kept blocks; grouped pads every group to the largest one.
    dense = layer.weight.shape[0] * layer.weight.shape[1]
    outs, ins = [len(f) for f in plan.filters], [len(c) for c in plan.channels]
    if used == "split":
        assert fraction == sum(o * i for o, i in zip(outs, ins)) / dense < 1.0
    else:
        assert fraction == len(outs) * max(outs) * max(ins) / dense


@pytest.mark.parametrize("mode", ["split", "grouped"])
def test_manifest_round_trip(mode):
    layer = nn.Conv2d(16, 12, 3, padding=1)
    assignment = _random_structure(layer, groups=4, keep=0.4, seed=3)
    new, _, _ = build_layer(layer, plan_layer("c", layer.weight, assignment), mode)
    spec = new.manifest_spec()
    assert spec["type"] in LAYER_TYPES
    import json

    spec = json.loads(json.dumps(spec))  # JSON-able, sizes only
    empty = LAYER_TYPES[spec["type"]].from_manifest(spec)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    empty.load_state_dict(new.state_dict())
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert torch.equal(empty(x), new(x))
    # Index buffers are persistent, so they travel in the state dict.
    assert "in_index" in new.state_dict()


def test_group_structure_reports_original_positions():
    layer = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1., 1, 0, 0, 0, 0],
                                         [0, 0, 0, 0, 2, 2],
                                         [3, 0, 3, 0, 0, 0],
                                         [0, 0, 0, 0, 4, 0]]))
    plan = plan_layer("l", layer.weight, torch.tensor([0, 1, 0, 1]))
    assert plan.summary() == [(2, 3), (2, 2)]
    new, _, _ = build_layer(layer, plan, "split")
    assert new.group_structure() == [{"inputs": [0, 1, 2], "outputs": [0, 2]}, {"inputs": [4, 5], "outputs": [1, 3]}]
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), new(x))


def test_plan_merges_identical_groups_and_makes_dead_filters_constant():
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1., 1, 0, 0],    # group 0 reads {0, 1}
                                         [0, 0, 1, 0],    # group 1 reads {2}
                                         [1, 0, 0, 0],    # group 2 reads {0, 1} with filter 3
                                         [0, 1, 0, 0],
                                         [0, 0, 0, 0],    # group 3: no input left (bias only)
                                         [0, 0, 0, 0]]))
    plan = plan_layer("l", layer.weight, torch.tensor([0, 1, 2, 2, 3, 3]))
    # groups 0 and 2 read the same channels: merged; group 3's filters only output their bias.
    assert [f.tolist() for f in plan.filters] == [[0, 2, 3], [1]]
    assert [c.tolist() for c in plan.channels] == [[0, 1], [2]]
    assert plan.constant.tolist() == [4, 5]
    assert plan.summary() == [(3, 2), (1, 1), (2, 0)]
    x = torch.randn(3, 4)
    for mode in ("split", "grouped"):
        new, _, fraction = build_layer(layer, plan, mode)
        assert new.const_rows == 2
        assert fraction == (7 / 24 if mode == "split" else 12 / 24)  # constant rows cost nothing
        with torch.no_grad():
            assert torch.allclose(layer(x), new(x), atol=1e-6)
        assert new.group_structure()[-1] == {"inputs": [], "outputs": [4, 5]}


def test_fully_zero_layer_still_converts():
    layer = nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        layer.weight.zero_()
    plan = plan_layer("c", layer.weight, torch.zeros(4, dtype=torch.long))
    new, _, _ = build_layer(layer, plan, "split")
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(layer(x), new(x))


def test_bad_layer_specs_fail_clearly():
    with pytest.raises(ValueError, match="mode"):
        DSPLinear(in_features=4, out_features=4, in_sizes=[4], out_sizes=[4], mode="fast")
    with pytest.raises(ValueError, match="equal"):
        DSPLinear(in_features=4, out_features=4, in_sizes=[1, 2], out_sizes=[2, 2], mode="grouped")
    with pytest.raises(ValueError, match="at least one"):
        DSPConv(ndim=2, in_channels=4, out_channels=4, kernel_size=(1, 1), in_sizes=[0, 2], out_sizes=[2, 2])
    with pytest.raises(ValueError, match="exactly 4 rows"):
        DSPLinear(in_features=4, out_features=4, in_sizes=[2, 2], out_sizes=[3, 3])
    with pytest.raises(ValueError, match="one group id per filter"):
        plan_layer("l", torch.ones(4, 3), torch.zeros(5, dtype=torch.long))


def test_auto_mode_picks_grouped_only_when_padding_is_cheap():
    layer = nn.Conv2d(8, 8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.kron(torch.eye(2), torch.ones(4, 4)).view(8, 8, 1, 1))  # two equal blocks
    balanced = plan_layer("c", layer.weight, torch.tensor([0] * 4 + [1] * 4))
    assert build_layer(layer, balanced, "auto")[1] == "grouped"
    with torch.no_grad():
        layer.weight[4:, 4:6] = 0  # the second group now reads 2 channels: padding would cost 33%
    uneven = plan_layer("c", layer.weight, torch.tensor([0] * 4 + [1] * 4))
    assert build_layer(layer, uneven, "auto")[1] == "split"
    assert build_layer(layer, uneven, "auto", grouped_padding=0.5)[1] == "grouped"
