"""Nothing is reported prunable that compress cannot remove; compress fails only with CompressionError."""

import warnings

import pytest
import torch
from helpers import outputs, relative_difference, zero_random_groups
from torch import nn

from hf_oto import GroupConfig, compress, find_groups
from hf_oto.compress import CompressionError
from hf_oto.testing.zoo import ZOO, build


class FFN(nn.Module):
    def __init__(self, width: int = 8, inner: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class CheckedFFN(FFN):
    """Checks its inner width against a number it keeps: the analysis sees no op using it."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        assert h.shape[-1] == self.expected, "inner width changed"
        return x + self.down(h)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FFN(), CheckedFFN(), FFN()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(4, 8),)


def test_dry_run_demotes_only_the_layer_that_breaks():
    model, inputs = _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = find_groups(model, inputs)
    by_layer = {}
    for g in groups:
        if g.kind == "neuron" and g.layer.startswith("blocks."):
            by_layer.setdefault(g.layer, set()).add((g.prunable, g.reason))
    assert by_layer["blocks.0"] == {(True, "")} and by_layer["blocks.2"] == {(True, "")}
    (flag, reason), = by_layer["blocks.1"]
    assert not flag and "compress cannot remove it" in reason and "blocks.1" in reason
    assert "assert h.shape[-1] == self.expected" in reason
    demoted = [str(w.message) for w in caught if "demoted" in str(w.message)]
    assert len(demoted) == 1 and "16 neuron groups" in demoted[0] and "blocks.1" in demoted[0]
    # What stays prunable compresses exactly.
    zero_random_groups(model, groups, 0.4, seed=3)
    reference = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    assert small.blocks[1].up.out_features == 16 and small.blocks[0].up.out_features < 16


def test_compress_raises_compression_error_naming_module_and_op():
    model, inputs = _net()
    groups = find_groups(model, inputs, GroupConfig(dry_run=False))
    assert all(g.prunable for g in groups if g.layer == "blocks.1")
    zero_random_groups(model, groups, 0.5, seed=1)
    with pytest.raises(CompressionError) as error:
        compress(model, groups)
    assert error.value.module == "blocks.1"
    assert "blocks.1" in str(error.value) and "self.expected" in str(error.value)


def test_compress_wraps_a_failure_while_building():
    model, inputs = _net()
    groups = find_groups(model, inputs, GroupConfig(dry_run=False))
    zero_random_groups(model, groups, 0.5, seed=1)

    class ReadOnly(nn.Linear):  # a layer whose size attribute cannot be set
        @property
        def out_features(self):
            return self.weight.shape[0]

        @out_features.setter
        def out_features(self, value):
            if getattr(self, "_frozen", False):
                raise AttributeError("out_features is read-only")

    layer = ReadOnly(8, 16)
    layer.load_state_dict(model.blocks[0].up.state_dict())
    layer._frozen = True
    model.blocks[0].up = layer
    with pytest.raises(CompressionError) as error:
        compress(model, groups, verify=False)
    assert error.value.module == "blocks.0.up" and "out_features" in str(error.value)


@pytest.mark.parametrize("name", list(ZOO))
def test_dry_run_demotes_nothing_on_the_zoo(name):
    model, inputs = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a demotion warns
        groups = find_groups(model, inputs, GroupConfig(prune_hidden=name in ("bert-qa", "llama-gqa")))
    plain = find_groups(model, inputs, GroupConfig(dry_run=False, prune_hidden=name in ("bert-qa", "llama-gqa")))
    assert torch.equal(groups.prunable_mask, plain.prunable_mask)
    assert not groups.notes


class SplitTail(nn.Module):
    """Cuts its projection as ``h[..., :-self.n_extra]``: the attribute holds the magnitude."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.out = nn.Linear(10, 3)
        self.n_extra = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(x))
        tail = h[..., -self.n_extra:] * torch.tensor([1.0, 2.0])  # fixed size: the tail stays
        return self.out(h[..., :-self.n_extra]) + tail.sum(-1, keepdim=True)


def test_negative_slice_bound_keeps_its_attribute_positive():
    torch.manual_seed(0)
    model, inputs = SplitTail().eval(), (torch.randn(4, 8),)
    groups = find_groups(model, inputs)
    assert groups.num_prunable == 10 and not groups.notes
    zero_random_groups(model, groups, 0.4, seed=0)
    reference = outputs(model, inputs)
    small = compress(model, groups)
    assert small.n_extra == 2 and small.proj.out_features == 8
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5


def test_a_model_that_cannot_be_copied_keeps_its_groups_with_a_note():
    import threading

    model, inputs = _net()
    model.lock = threading.Lock()  # deepcopy refuses locks
    groups = find_groups(model, inputs)
    assert groups.num_prunable == find_groups(model, inputs, GroupConfig(dry_run=False)).num_prunable
    assert groups.notes and "cannot be copied" in groups.notes[0]
    assert "dry run skipped" in groups.summary()


class ScaledFFN(FFN):
    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(1.0, 2.0, 16), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)) * self.scale)


@pytest.mark.parametrize("persistent", [True, False])
def test_groups_slicing_a_buffer_the_checkpoint_lacks_are_not_prunable(persistent):
    torch.manual_seed(0)
    model, inputs = ScaledFFN(persistent).eval(), (torch.randn(4, 8),)
    groups = find_groups(model, inputs)
    inner = {int(g) for s in groups.slices if s.tensor == "up.weight" and s.dim == 0 for g in s.group}
    neurons = [groups[g] for g in sorted(inner)]
    assert len(neurons) == 16
    if persistent:
        assert all(g.prunable for g in neurons)
    else:
        assert not any(g.prunable for g in neurons) and "non-persistent buffer 'scale'" in neurons[0].reason
