"""Unsupported constructs get clear errors or warnings; nothing is guessed or modified silently."""

import pytest
import torch
from helpers import outputs, relative_difference, zero_random_groups
from torch import nn

from hf_oto import CompressionError, GroupConfig, compress, find_groups
from hf_oto.testing.zoo import build


class SortsChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.sort(x, dim=1).values  # an op the analysis has no rule for
        return self.c(torch.relu(self.b(x)))


def test_unknown_op_warns_and_marks_its_structures_unprunable():
    model = SortsChannels()
    with pytest.warns(UserWarning, match=r"aten\.sort.*module '<root>'"):
        groups = find_groups(model, (torch.randn(1, 3, 8, 8),))
    assert any("sort" in op for op in groups.unsupported_ops)
    a_groups = [g for g in groups if g.layer == "a"]
    assert a_groups and not any(g.prunable for g in a_groups)
    assert sum("does not understand" in g.reason for g in a_groups) == 8  # a's output channels
    assert sum("model input" in g.reason for g in a_groups) == 3  # the RGB input channels
    assert any(g.prunable and g.layer in ("b", "") for g in groups)  # b's own channels are fine
    assert "did not understand" in groups.summary()


class FixedReshape(nn.Module):
    """Reshapes with a literal the module does not keep in an attribute."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)

    def forward(self, x):
        h = self.up(x).view(x.shape[0], 3, 4)  # 3 and 4 are written in the code
        return self.down(torch.relu(h).reshape(x.shape[0], -1))


def test_hard_coded_size_marks_dimension_unprunable_with_reason():
    groups = find_groups(FixedReshape(), (torch.randn(2, 6),))
    hidden = [g for g in groups if g.layer == ""]
    assert hidden and not any(g.prunable for g in hidden)
    assert any("holds it in no attribute" in g.reason for g in hidden)


class SizedByAnotherWidth(nn.Module):
    """Views its output by its input's width (as Transformers' grouped-mm experts do with
    ``hidden_states.size(-1)``): two widths that shrink by neurons of their own must stay equal."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.proj_out = nn.Linear(16, 3)
        self.other = nn.Linear(6, 8)
        self.other_out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj_in(x)
        y = self.mid(torch.relu(h))
        y = y.view(x.shape[0], 1, h.size(-1)).sum(1)
        return self.proj_out(torch.relu(y)) + self.other_out(torch.relu(self.other(x)))


def test_a_width_sized_by_another_width_stays_with_it():
    """Both widths stay, with the analysis's reason, and what remains compresses exactly. Without
    the rule the view's width was bound to an attribute of the same value; here compress's dry run
    caught the failure, in Muse Spark's experts nothing did and compress refused the model."""
    torch.manual_seed(0)
    model, inputs = SizedByAnotherWidth().eval(), (torch.randn(2, 6),)
    groups = find_groups(model, inputs)
    stuck = [g for g in groups if not g.prunable and "by another one's size" in g.reason]
    assert len(stuck) == 32                                   # 16 + 16 positions
    free = [g for g in groups if g.prunable]
    assert len(free) == 8                                      # the unrelated branch's neurons
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[[g.index for g in free[:3]]] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    before = model(*inputs)
    small = compress(model, groups)
    assert small.other.out_features == 5 and torch.allclose(small(*inputs), before, atol=1e-6)


class HeadsByAttribute(nn.Module):
    """Attention that writes the head count from an attribute instead of inferring it."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.proj(out)


def test_head_count_attribute_is_updated_by_compress():
    torch.manual_seed(0)
    model = HeadsByAttribute().eval()
    x = torch.randn(2, 5, 16)
    groups = find_groups(model, (x,))
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[heads[1].index] = mask[heads[3].index] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    small = compress(model, groups)
    assert small.num_heads == 2
    assert relative_difference(outputs(model, (x,)), outputs(small, (x,))) <= 1e-6


def test_groups_from_another_model_are_refused():
    model, inputs = build("bert-qa")
    other, _ = build("distilbert")
    groups = find_groups(model, inputs)
    with pytest.raises(ValueError, match="another model"):
        compress(other, groups)
    with pytest.raises(ValueError, match="another model"):
        groups.parameters(other)


def test_model_changed_after_analysis_is_refused():
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    model.classifier[1] = nn.Linear(512, 32)
    with pytest.raises(ValueError, match="classifier.1.weight"):
        compress(model, groups)


def test_removing_unprunable_group_is_refused():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    blocked = next(g for g in groups if not g.prunable)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[blocked.index] = True
    with pytest.raises(CompressionError, match="not prunable"):
        compress(model, groups, remove=mask)
    with pytest.raises(ValueError, match="mask over"):
        compress(model, groups, remove=torch.zeros(3, dtype=torch.bool))


def test_plain_module_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        find_groups(SortsChannels())


def test_config_exclude_and_switches():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs, GroupConfig(prune_heads=False, exclude=[r"layer\.1\b"]))
    assert not any(g.prunable for g in groups if g.kind == "head")
    assert all(not g.prunable and "exclude" in g.reason for g in groups if ".layer.1" in g.layer and g.kind == "neuron")
    assert any(g.prunable for g in groups if ".layer.0" in g.layer and g.kind == "neuron")
    with pytest.raises(ValueError, match="unknown GroupConfig fields"):
        GroupConfig.from_dict({"prune_everything": True})
    assert GroupConfig.from_json(GroupConfig(exclude=["x"]).to_json()) == GroupConfig(exclude=["x"])


def test_nothing_zero_means_nothing_removed():
    model, inputs = build("resnet")
    groups = find_groups(model, inputs)
    small = compress(model, groups)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())


def test_inplace_compression_modifies_the_model():
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.5)
    reference = outputs(model, inputs)
    before = sum(p.numel() for p in model.parameters())
    result = compress(model, groups, inplace=True)
    assert result is model
    assert sum(p.numel() for p in model.parameters()) < before
    assert relative_difference(reference, outputs(model, inputs)) <= 1e-5


def test_compress_by_ratio_removes_smallest_groups():
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    params = groups.parameters(model)
    norms = groups.norms(params)
    small = compress(model, groups, ratio=0.5)
    removed = int(0.5 * groups.num_prunable)
    before = sum(p.numel() for p in model.parameters())
    expected_mask = torch.zeros(len(groups), dtype=torch.bool)
    prunable = groups.prunable_mask.nonzero().flatten()
    expected_mask[prunable[torch.argsort(norms[prunable], stable=True)[:removed]]] = True
    expected = before - groups.removed_param_count(groups.feasible_removal(expected_mask))
    assert sum(p.numel() for p in small.parameters()) == expected
    assert torch.equal(groups.norms(groups.parameters(model)), norms)  # input untouched
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            compress(model, groups, ratio=bad)
    with pytest.raises(ValueError, match="scope must be"):
        compress(model, groups, ratio=0.5, scope="model")
    with pytest.raises(ValueError, match="scope only applies with ratio"):
        compress(model, groups, scope="layer")
