"""Pieces of bench/compare.py's rows: the shared schedule, FLOPs targeting, the baselines' schedules
and the authors' library shim."""

import importlib.util

import pytest
import torch
from transformers import BertConfig, BertModel

from bench.methods.magnitude import GradualMagnitude, PruneThenFinetune
from bench.methods.targets import FlopsTarget, rms_magnitude
from bench.tasks.base import Budget, epoch_batches
from hf_oto import find_groups


def test_budget_window_periods_and_learning_rate():
    b = Budget(steps=100, batch_size=8, learning_rate=1e-3, warmup=0.1, pruning_start=0.1, pruning_end=0.6,
               pruning_periods=5)
    assert b.window() == (10, 60) and b.period_starts() == [10, 20, 30, 40, 50]
    lrs = [b.learning_rate_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= c for a, c in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0
    assert b.scaled(40).steps == 40 and b.scaled(40).pruning_periods == 5
    with pytest.raises(ValueError, match="too few"):
        Budget(steps=8, batch_size=1, learning_rate=1.0, pruning_periods=10).window()


def test_epoch_batches_cover_an_epoch_and_depend_only_on_the_seed():
    data = {"x": torch.arange(10), "y": torch.arange(10) * 2}
    first = [b for _, b in zip(range(3), epoch_batches(data, 3, seed=0))]
    again = [b for _, b in zip(range(3), epoch_batches(data, 3, seed=0))]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    seen = torch.cat([b["x"] for b in first])
    assert len(set(seen.tolist())) == 9 and torch.equal(first[0]["y"], first[0]["x"] * 2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(epoch_batches(data, 11, seed=0))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                 intermediate_size=96), add_pooling_layer=False).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 24))}
    groups = find_groups(model, inputs)
    return model, groups, inputs, FlopsTarget(model, groups, inputs)


@pytest.mark.parametrize("target", [0.7, 0.5, 0.35])
def test_removal_meets_the_flops_target_with_one_group_to_spare(bert, target):
    model, groups, _, flops = bert
    scores = rms_magnitude(groups, groups.parameters(model))
    mask = flops.remove_by_score(scores, target)
    assert flops.kept(mask) <= target
    # one group fewer would miss it: the order is the removal order, the prefix is the shortest
    order = flops._order(scores.float())
    k = int(mask.sum())
    assert flops.kept(flops._first(order, k - 1)) > target
    # about the same share of every (layer, kind) block
    block = flops.block
    shares = [float(mask[block == b].float().mean()) for b in range(len(flops.sizes))]
    assert max(shares) - min(shares) <= 1.0 / min(flops.sizes).item() + 1e-6


def test_removal_keeps_what_was_removed_and_takes_the_lowest_scores(bert):
    model, groups, _, flops = bert
    scores = torch.rand(len(groups))
    first = flops.remove_by_score(scores, 0.8)
    more = flops.remove_by_score(scores, 0.5, already=first)
    assert (more & first).sum() == first.sum() and flops.kept(more) <= 0.5
    for b in range(len(flops.sizes)):  # inside a block the removed groups score lowest
        members = flops.block == b
        removed, kept = scores[members & first], scores[members & ~first]
        if len(removed) and len(kept):
            assert removed.max() <= kept.min()


def test_uniform_sparsity_is_the_share_of_the_target(bert):
    _, groups, _, flops = bert
    s5, s3 = flops.uniform_sparsity(0.5), flops.uniform_sparsity(0.3)
    assert 0.3 < s5 < s3 < 1.0


def test_baseline_schedules():
    b = Budget(steps=100, batch_size=8, learning_rate=1e-3, pruning_periods=4)

    class Ctx:
        budget, target_kept_flops = b, 0.4

    assert PruneThenFinetune().targets(Ctx) == {10: 0.4}
    gradual = GradualMagnitude().targets(Ctx)
    assert list(gradual) == b.period_starts()
    values = list(gradual.values())
    assert values[-1] == pytest.approx(0.4) and all(a > c for a, c in zip(values, values[1:]))
    # cubic: most of the removal early (Zhu & Gupta)
    assert 1 - values[0] > (1 - 0.4) / 4


def test_authors_library_shim_imports_it():
    if importlib.util.find_spec("only_train_once") is None:
        pytest.skip("only-train-once is not installed")
    from bench.methods.authors_oto import AuthorsHESSO, cuda_calls_stay_on_cpu

    assert AuthorsHESSO().available() is None  # imports, with the shim
    x = torch.zeros(2)
    with cuda_calls_stay_on_cpu():
        assert x.cuda() is x or torch.cuda.is_available()
