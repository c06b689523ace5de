"""DSP conversion on the vision zoo: exact on random sparsity patterns, FLOPs drop as predicted,
permutations folded into neighbours where the zero-invariant groups allow it."""

import pytest
import torch
from helpers import outputs, relative_difference

from hf_oto import ZeroInvariantGroups, find_groups
from hf_oto.compress.hf_oto_layers_dsp import DSPConv, DSPLinear
from hf_oto.methods.dsp import DSPConfig, convert, find_dsp_layers, profile, structure_macs
from hf_oto.measure import count_flops
from hf_oto.testing.zoo import build

VISION = ["vgg-bn", "resnet", "convnext"]


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model, config: DSPConfig, keep: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random hard assignments, and zero every (group, input channel) block not kept."""
    layers, _ = find_dsp_layers(model, config)
    gen = torch.Generator().manual_seed(seed)
    assignments = {}
    with torch.no_grad():
        for path, layer in layers.items():
            n, c = layer.weight.shape[:2]
            a = torch.randint(0, config.max_groups, (n,), generator=gen)
            kept = torch.rand(config.max_groups, c, generator=gen) < keep
            layer.weight.mul_(kept[a].float().view(n, c, *([1] * (layer.weight.dim() - 2))))
            assignments[path] = a
    return assignments


@pytest.mark.parametrize("mode", ["split", "grouped"])
@pytest.mark.parametrize("name", VISION)
def test_conversion_is_exact_on_random_patterns(name, mode):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    config = DSPConfig(max_groups=4, min_in_channels=2)
    for seed in (0, 1):
        assignments = randomise(model, config, keep=0.4 + 0.2 * seed, seed=seed)
        report = []
        small = convert(model, assignments, groups=groups, mode=mode, report=report)
        assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5
        replaced = [e for e in report if e.replaced]
        assert replaced, "nothing was converted"
        for e in replaced:
            assert isinstance(small.get_submodule(e.path), (DSPConv, DSPLinear))
            assert e.mode == mode or sum(i > 0 for _, i in e.groups) == 1  # one live group: split
        assert count_flops(small, inputs) < count_flops(model, inputs)


@pytest.mark.parametrize("name", VISION)
def test_split_flops_equal_the_learned_structure(name):
    """The converted model's measured FLOPs are the dense FLOPs minus the pruned blocks."""
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    config = DSPConfig(max_groups=3, min_in_channels=2)
    assignments = randomise(model, config, keep=0.5, seed=3)
    total, costs = profile(model, inputs, list(assignments))
    assert total == count_flops(model, inputs)
    predicted = total - 2 * sum(costs[p].dense_macs - structure_macs(model.get_submodule(p).weight, a, costs[p])
                                for p, a in assignments.items())
    report = []
    small = convert(model, assignments, groups=groups, mode="split", report=report)
    # Filters left without inputs become constant rows: the prediction is exact.
    assert count_flops(small, inputs) == predicted


def test_vgg_permutations_fold_into_neighbours():
    """Chained convs and the flatten into the classifier take the permutation; only the layer
    producing the model output keeps an output index."""
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    assignments = randomise(model, DSPConfig(max_groups=4), seed=5)
    report = []
    small = convert(model, assignments, groups=groups, report=report)
    by_path = {e.path: e for e in report}
    for path in ("features.1.0", "features.3.0", "features.5.0", "classifier.1"):
        assert by_path[path].folded and not by_path[path].out_index, by_path[path]
        assert small.get_submodule(path).out_index is None
    assert not by_path["classifier.4"].folded and by_path["classifier.4"].out_index
    assert "model output" in by_path["classifier.4"].note
    # Folding moved the BatchNorm statistics along with the filters.
    assert not torch.equal(small.features[1][1].running_mean, model.features[1][1].running_mean)
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5


def test_shared_residual_stream_is_reordered_once():
    model, inputs = build("resnet")
    groups = find_groups(model, inputs)
    assignments = randomise(model, DSPConfig(max_groups=4, min_in_channels=2), seed=2)
    report = []
    convert(model, assignments, groups=groups, report=report)
    notes = {e.path: e for e in report}
    stream = [p for p in notes if p.endswith("layer.2.convolution") and ".stages.1." in p]
    shortcut = "resnet.encoder.stages.1.layers.0.shortcut.convolution"
    # The shortcut claims the stage's stream first; the block's last conv keeps an index.
    assert notes[shortcut].folded
    assert all(notes[p].out_index and "already reordered" in notes[p].note for p in stream)


def test_without_groups_layers_keep_output_indices():
    model, inputs = build("vgg-bn")
    assignments = randomise(model, DSPConfig(max_groups=4), seed=1)
    report = []
    small = convert(model, assignments, example_inputs=inputs, report=report)
    assert all(not e.folded or not e.out_index for e in report)
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5


def test_wrong_groups_fall_back_to_output_indices():
    """If the analysis missed a use of the channels, folding changes the outputs: convert notices,
    warns and converts again without folding."""
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    broken = ZeroInvariantGroups(groups.groups, [s for s in groups.slices if not s.tensor.startswith("features.1.1")],
                                 groups.tensor_shapes, groups.tensor_aliases, example_inputs=inputs)
    assignments = randomise(model, DSPConfig(max_groups=4), seed=4)
    report = []
    with pytest.warns(UserWarning, match="converting again"):
        small = convert(model, assignments, groups=broken, report=report)
    assert not any(e.folded and e.out_index for e in report)
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5


def test_trivial_layers_are_left_alone():
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    # One group reading every input: nothing to restructure.
    assignments = {"features.3.0": torch.zeros(32, dtype=torch.long)}
    report = []
    small = convert(model, assignments, groups=groups, report=report)
    assert isinstance(small.features[3][0], torch.nn.Conv2d)
    assert report[0].mode == "dense" and not report[0].replaced


def test_profile_counts_the_same_flops_as_the_trainer_on_attention_models():
    """The FLOPs target is a share of the model's total: fused attention must be in that total."""
    model, inputs = build("bert-seq-cls")
    layers, _ = find_dsp_layers(model, DSPConfig(min_in_channels=2))
    assert layers
    total, costs = profile(model, inputs, list(layers))
    assert total == count_flops(model, inputs)
    assert set(costs) == set(layers)
