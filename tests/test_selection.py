"""Which groups HESSO and DHSPG choose: loss-based saliency, FLOPs/parameter targets, aligned counts."""

import math

import pytest
import torch
from torch import nn

from hf_oto import compress, find_groups
from hf_oto.costs import GroupCosts
from hf_oto.measure import count_flops, num_parameters
from hf_oto.optim import HESSO, create_oto_optimizer
from hf_oto.optim._index import PrunableIndex
from hf_oto.optim.saliency import LOSS_SALIENCIES, group_dots, loss_saliency
from hf_oto.optim.selection import SelectionConfig
from hf_oto.testing.zoo import build

from helpers import group_element_mask, outputs, relative_difference, zero_random_groups
from test_optim import _train

# -- the scores, vectorised against a naive loop ---------------------------------------------------


def _naive_dots(groups, params, grads, absolute=False):
    out = torch.zeros(len(groups), dtype=torch.float64)
    for g in range(len(groups)):
        if groups[g].prunable:
            for name, x, d in zip(groups.param_names, params, grads):
                prod = x.double() * d.double()
                out[g] += (prod.abs() if absolute else prod)[group_element_mask(groups, name, x, g)].sum()
    return out


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("name", ["densenet-block", "bert-qa"])  # densenet: groups overlap on conv weights
def test_group_dots_equal_a_naive_loop_over_groups(name, absolute):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    params = groups.parameters(model)
    grads = [torch.randn_like(p) for p in params]
    index = PrunableIndex(groups, params, torch.device("cpu"))
    got = group_dots(index, [p.detach() for p in params], grads, absolute=absolute)
    want = _naive_dots(groups, params, grads, absolute)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
    if absolute:  # no cancellation inside a group: larger than the signed sum's magnitude
        signed = _naive_dots(groups, params, grads)
        assert (want >= signed.abs() - 1e-9).all() and (want[groups.prunable_mask] > 0).all()


def test_accumulated_taylor_abs_scores_equal_naive_sums_over_the_batches():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    params = groups.parameters(model)
    opt = HESSO(model, groups, variant="adamw", lr=1e-3, start_pruning_step=6, pruning_steps=10, pruning_periods=1,
                selection={"saliency_steps": 4})
    assert opt.selection.saliency == "taylor_abs"  # the default
    naive = torch.zeros(len(groups), dtype=torch.float64)
    for k in range(6):
        opt.zero_grad()
        model(**_bert_batch(k)).loss.backward()
        if k >= 3:
            naive += _naive_dots(groups, [p.detach() for p in params], [p.grad for p in params], absolute=True)
        opt.step()
    assert torch.allclose(opt._oto["saliency_sum"].double(), naive, rtol=1e-4, atol=1e-5)
    assert torch.equal(loss_saliency("taylor_abs", opt._oto["saliency_sum"], opt._oto["saliency_sq"]),
                       opt._oto["saliency_sum"])


def test_accumulated_taylor_and_fisher_scores_equal_naive_sums_over_the_batches():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    params = groups.parameters(model)
    # Selection at step 6; scores accumulate over the 3 steps before it (3, 4, 5) and step 6 itself.
    opt = HESSO(model, groups, variant="adamw", lr=1e-3, start_pruning_step=6, pruning_steps=10, pruning_periods=1,
                selection={"saliency": "fisher", "saliency_steps": 4})
    naive_sum = torch.zeros(len(groups), dtype=torch.float64)
    naive_sq = torch.zeros(len(groups), dtype=torch.float64)
    seen = []
    for k in range(6):
        opt.zero_grad()
        model(**_bert_batch(k)).loss.backward()
        if k >= 3:
            d = _naive_dots(groups, [p.detach() for p in params], [p.grad for p in params])
            naive_sum += d
            naive_sq += d * d
        opt.step()
        seen.append(opt._oto["saliency_batches"])
    assert seen == [0, 0, 0, 1, 2, 3]  # only the steps just before the selection pay for the scores
    assert torch.allclose(opt._oto["saliency_sum"].double(), naive_sum, rtol=1e-4, atol=1e-5)
    assert torch.allclose(opt._oto["saliency_sq"].double(), naive_sq, rtol=1e-3, atol=1e-8)
    opt.zero_grad()
    model(**_bert_batch(6)).loss.backward()
    opt.step()  # the selection: scores used, then cleared for the next period
    assert opt._oto["saliency_batches"] == 0 and opt.redundant_groups().any()


def _bert_batch(step):
    from test_optim import _bert_batch as batch

    return batch(step)


# -- Taylor chooses by the loss, magnitude by size -------------------------------------------------


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 6)
        self.down = nn.Linear(6, 1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _misleading_magnitudes() -> _TwoLayer:
    """Neuron 0 has the largest weights but reads a feature a thousand times smaller than the others:
    it barely moves the output. Neuron 5 has the smallest weights and carries most of the signal."""
    model = _TwoLayer()
    with torch.no_grad():
        model.up.weight.zero_()
        model.up.bias.zero_()
        model.down.bias.zero_()
        for i, (w_in, w_out) in enumerate([(4.0, 4.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (0.6, 0.6)]):
            model.up.weight[i, i] = w_in
            model.down.weight[0, i] = w_out
    return model


def _regression_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 6, generator=g).abs()
    x[:, 0] *= 1e-3
    y = x @ torch.tensor([0.0, 1.5, 1.5, 1.5, 1.5, 3.0])  # the model underfits: gradients are not zero
    return x, y


@pytest.mark.parametrize("saliency, removed", [("taylor_abs", 0), ("taylor", 0), ("fisher", 0), ("magnitude", 5)])
def test_loss_based_saliency_removes_the_big_neuron_that_does_nothing(saliency, removed):
    model = _misleading_magnitudes()
    x, _ = _regression_batch(0)
    groups = find_groups(model, (x,))
    assert groups.num_prunable == 6
    opt = HESSO(model, groups, variant="sgd", lr=0.0, start_pruning_step=4, pruning_steps=2, pruning_periods=1,
                target_group_sparsity=1 / 6 + 1e-6, selection={"saliency": saliency})
    for k in range(6):
        x, y = _regression_batch(k)
        opt.zero_grad()
        nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
        opt.step()
    zero_rows = (model.up.weight.abs().sum(1) == 0).nonzero().flatten().tolist()
    assert zero_rows == [removed]


# -- near-zero gradients: distilling a model into itself --------------------------------------------


def _self_distillation(dropout: float):
    """A student and its own copy as teacher. Each head's value rows and each neuron's output
    column are scaled (so removals do different damage), and each head's query rows scaled by b,
    its key rows by 1/b (same function, magnitudes that say nothing about the damage)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    student = BertModel(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.encoder.layer:
            att = layer.attention.self
            for h in range(6):
                rows = slice(8 * h, 8 * (h + 1))
                att.value.weight[rows] *= 0.1 + 2.9 * torch.rand(1, generator=gen)
                b = torch.exp(2 * torch.randn(1, generator=gen))
                att.query.weight[rows] *= b
                att.query.bias[rows] *= b
                att.key.weight[rows] /= b
                att.key.bias[rows] /= b
            layer.output.dense.weight *= 0.1 + 2.9 * torch.rand(1, 48, generator=gen)
    teacher = BertModel(cfg)
    teacher.load_state_dict(student.state_dict())
    teacher.eval()
    ids = [torch.randint(0, 120, (8, 16), generator=torch.Generator().manual_seed(k)) for k in range(11)]
    with torch.no_grad():
        targets = [teacher(input_ids=i).last_hidden_state for i in ids]
    return student, ids, targets


def _accumulate(student, ids, targets, saliency, steps=10):
    """Scores accumulated over ``steps`` batches at a fixed point (lr 0); the selection is the next step."""
    groups = find_groups(student, {"input_ids": ids[0]})
    opt = HESSO(student, groups, variant="adamw", lr=0.0, start_pruning_step=steps, pruning_steps=1,
                pruning_periods=1, target_group_sparsity=0.3,
                selection={"saliency": saliency, "saliency_steps": steps + 1})
    student.train()
    for k in range(steps):
        _distill_step(opt, student, ids[k], targets[k])
    scores = None
    if saliency in LOSS_SALIENCIES:
        scores = loss_saliency(saliency, opt._oto["saliency_sum"], opt._oto["saliency_sq"]).clone()
    return groups, opt, scores


def _distill_step(opt, student, ids, target):
    opt.zero_grad()
    nn.functional.mse_loss(student(input_ids=ids).last_hidden_state, target).backward()
    opt.step()


def _damage(student, groups, ids, targets):
    """The distillation loss after removing each prunable group alone (eval mode: exact effect)."""
    params = groups.parameters(student)
    student.eval()
    out = torch.zeros(len(groups))
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for g in groups.prunable_mask.nonzero().flatten().tolist():
            mask = torch.zeros(len(groups), dtype=torch.bool)
            mask[g] = True
            groups.zero_(params, mask)
            out[g] = sum(float(nn.functional.mse_loss(student(input_ids=i).last_hidden_state, t))
                         for i, t in zip(ids[:4], targets[:4]))
            for p, s in zip(params, saved):
                p.copy_(s)
    return out


def _rank_correlation(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("saliency", ["fisher", "taylor_abs"])
def test_with_dropout_loss_scores_track_the_damage_of_removal_where_the_mean_gradient_is_zero(saliency):
    student, ids, targets = _self_distillation(dropout=0.1)
    groups, _, scores = _accumulate(student, ids, targets, saliency)
    assert (scores[groups.prunable_mask] > 0).all()  # dropout makes every batch's gradient a probe of the outputs
    damage = _damage(student, groups, ids, targets)
    for kind in ("head", "neuron"):
        sel = torch.tensor([g.kind == kind and g.prunable for g in groups])
        assert _rank_correlation(scores[sel], damage[sel]) > 0.6, (kind, _rank_correlation(scores[sel], damage[sel]))
    heads = torch.tensor([g.kind == "head" for g in groups])  # their magnitudes were scrambled
    norms = groups.norms(groups.parameters(student))
    assert _rank_correlation(norms[heads], damage[heads]) < 0.3


def test_exactly_zero_gradients_fall_back_to_magnitude():
    chosen = {}
    for saliency in ("fisher", "taylor_abs", "magnitude"):
        student, ids, targets = _self_distillation(dropout=0.0)  # student == teacher: every gradient is exactly 0
        groups, opt, scores = _accumulate(student, ids, targets, saliency)
        if scores is not None:
            assert (scores == 0).all()
        _distill_step(opt, student, ids[-1], targets[-1])  # the selection
        chosen[saliency] = opt.redundant_groups()
    assert int(chosen["fisher"].sum()) == int(0.3 * groups.num_prunable)
    assert torch.equal(chosen["fisher"], chosen["magnitude"])
    assert torch.equal(chosen["taylor_abs"], chosen["magnitude"])


# -- FLOPs and parameter targets, met by the compressed model ---------------------------------------


def _largest_group_cost(costs, groups, unit):
    return float(costs.marginal(torch.zeros(len(groups), dtype=torch.bool), unit).max())


@pytest.mark.parametrize("name", ["bert-qa", "vgg-bn", "resnet"])
@pytest.mark.parametrize("unit, target", [("flops", 0.5), ("params", 0.6)])
def test_flops_and_params_targets_are_met_by_the_compressed_model(name, unit, target):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    model.train()
    kw = dict(variant="adamw", lr=1e-3) if name == "bert-qa" else dict(variant="sgd", lr=0.05, momentum=0.9)
    opt = create_oto_optimizer(model, groups, method="hesso", start_pruning_step=2, pruning_steps=6,
                               pruning_periods=3, **{f"target_kept_{unit}": target}, **kw)
    _train_on_noise(model, opt, inputs, 10)
    model.eval()
    before = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(before, outputs(small, inputs)) < 1e-5
    dense = count_flops(model, inputs) if unit == "flops" else num_parameters(model)
    kept = (count_flops(small, inputs) if unit == "flops" else num_parameters(small)) / dense
    # Met from below, short by less than one group's cost (the closing group).
    costs = GroupCosts.measure(model, groups, inputs)
    assert target - _largest_group_cost(costs, groups, unit) / dense <= kept <= target + 1e-9
    assert opt.metrics()[f"planned_kept_{unit}"] == pytest.approx(kept, abs=1e-9)
    assert opt.metrics()[f"target_kept_{unit}"] == target
    assert int(opt.zero_groups().sum()) == opt.target_num_zero_groups


def _train_on_noise(model, opt, inputs, steps):
    """A few steps on random inputs shaped like ``inputs`` (token ids or images), loss: mean square
    of the first output. Enough for the schedule; the targets do not depend on what is learnt."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if isinstance(inputs, dict):
            batch = {k: (torch.randint(0, 120, v.shape, generator=gen) if k == "input_ids" else
                         v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                     for k, v in inputs.items()}
            out = model(**batch)[0]
        else:
            out = model(*[x + 0.1 * torch.randn(x.shape, generator=gen) for x in inputs])
        opt.zero_grad()
        out.float().square().mean().backward()
        opt.step()


def _heads_worth_two_neurons():
    """bert-qa's groups and costs, with importances where a head is worth two neurons but costs more
    than four (so per FLOP every head ranks below every neuron)."""
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    heads = [g.index for g in groups if g.kind == "head" and g.prunable]
    neurons = [g.index for g in groups if g.kind == "neuron" and g.prunable]
    costs = GroupCosts.measure(model, groups, inputs)
    importance = torch.zeros(len(groups), dtype=torch.float64)
    importance[neurons] = 1.0
    importance[heads] = 2.0
    none = torch.zeros(len(groups), dtype=torch.bool)
    marginal = costs.marginal(none, "flops")
    assert marginal[heads].min() > 4 * marginal[neurons].max()
    return groups, costs, heads, neurons, importance, none, marginal


def test_a_flops_target_makes_heads_compete_with_neurons():
    """A head costs as much as many neurons: priced by FLOPs, removing one is worth it when its
    saliency per FLOP is low."""
    from hf_oto.optim.selection import GroupSelector

    groups, costs, heads, neurons, importance, none, marginal = _heads_worth_two_neurons()
    by_flops = GroupSelector(groups, SelectionConfig(target_kept_flops=0.7), costs)
    four_heads = 4 * float(marginal[heads[0]])
    chosen = by_flops.choose(four_heads, importance, torch.zeros_like(importance), groups.prunable_mask, none)
    assert int(chosen[heads].sum()) == 4 and not chosen[neurons].any()
    by_count = GroupSelector(groups, SelectionConfig(), costs)
    chosen = by_count.choose(4, importance, torch.zeros_like(importance), groups.prunable_mask, none)
    assert int(chosen[neurons].sum()) == 4 and not chosen[heads].any()


def test_a_group_costlier_than_a_period_share_is_taken_in_its_turn():
    """Before the last period a head that costs more than the period's whole share, and ranks
    lowest per FLOP, is taken (the period overshoots) instead of never fitting; a limit it would
    pass, or no limit (the last period), keeps the exact fill, which passes it over for neurons."""
    from hf_oto.optim.selection import GroupSelector

    groups, costs, heads, neurons, importance, none, marginal = _heads_worth_two_neurons()
    tie = torch.zeros_like(importance)
    selector = GroupSelector(groups, SelectionConfig(target_kept_flops=0.7), costs)
    head = float(marginal[heads].min())
    share = 0.5 * head

    exact = selector.choose(share, importance, tie, groups.prunable_mask, none)
    assert exact[neurons].any() and not exact[heads].any()
    assert share <= selector.removed(exact) < share + float(marginal[neurons].max()) + 1e-6

    in_turn = selector.choose(share, importance, tie, groups.prunable_mask, none, limit=10 * head)
    assert int(in_turn[heads].sum()) == 1 and not in_turn[neurons].any()
    assert selector.removed(in_turn) == pytest.approx(head)

    too_far = selector.choose(share, importance, tie, groups.prunable_mask, none, limit=0.75 * head)
    assert torch.equal(too_far, exact)
    last_period = selector.choose(share, importance, tie, groups.prunable_mask, none, limit=share)
    assert torch.equal(last_period, exact)


def test_hesso_removes_an_all_zero_head_that_costs_more_than_a_period_share():
    """A FLOPs target spread over many periods: each period's share is below one head's cost. An
    all-zero head (the least important group there is; it stays zero, its gradients are zero) is
    chosen in the first period and counts toward the target. The exact fill never chose it: it
    removed the whole target in nonzero neurons, and compress, finding the head zero, took the
    model 4.6% of its FLOPs below the target."""
    torch.manual_seed(0)
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    heads = [g.index for g in groups if g.kind == "head" and g.prunable]
    costs = GroupCosts.measure(model, groups, inputs)
    none = torch.zeros(len(groups), dtype=torch.bool)
    periods, target = 10, 0.9
    share = (1 - target) / periods * costs.total("flops")
    head = float(costs.marginal(none, "flops")[heads[0]])
    assert head > share
    dead = torch.zeros(len(groups), dtype=torch.bool)
    dead[heads[0]] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), dead)
    model.train()
    opt = create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=1e-3, target_kept_flops=target,
                               start_pruning_step=0, pruning_steps=20, pruning_periods=periods,
                               saliency="magnitude")
    _train_on_noise(model, opt, inputs, 2)   # the first period's selection has run
    assert opt.metrics()["planned_kept_flops"] <= 1 - head / costs.total("flops") + 1e-9  # the head, past the share
    _train_on_noise(model, opt, inputs, 20)
    model.eval()
    assert bool(groups.zero_mask(groups.parameters(model))[heads[0]])
    kept = count_flops(compress(model, groups), inputs) / count_flops(model, inputs)
    assert target - 0.02 < kept <= target + 1e-9


# -- hardware-aligned counts --------------------------------------------------------------------


def _kept_per_layer(groups, removed):
    from hf_oto.optim.selection import _blocks

    block, total = _blocks(groups)
    layer = torch.tensor([b for b in block.tolist()])
    kept = total.clone()
    kept -= torch.bincount(layer[removed & (layer >= 0)], minlength=total.numel())
    return kept, total


@pytest.mark.parametrize("name, target", [("bert-qa", dict(target_kept_flops=0.5)),
                                          ("vgg-bn", dict(target_group_sparsity=0.5)),
                                          ("llama-gqa", dict(target_kept_params=0.7))])
@pytest.mark.parametrize("method", ["hesso", "dhspg"])
def test_group_divisible_keeps_every_layer_a_multiple_of_n(name, target, method):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    model.train()
    opt = create_oto_optimizer(model, groups, method=method, variant="adamw", lr=1e-3, start_pruning_step=2,
                               pruning_steps=6, pruning_periods=3, group_divisible=4, **target)
    _train_on_noise(model, opt, inputs, 10)
    removed = opt.zero_groups() & groups.prunable_mask
    assert removed.any() and opt.pruning_finished
    kept, total = _kept_per_layer(groups, removed)
    touched = kept < total
    assert touched.any()
    assert (kept[touched] % 4 == 0).all() and (kept[touched] >= 4).all()
    assert (kept[total < 4] == total[total < 4]).all()  # too small to align: left whole
    model.eval()
    before = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(before, outputs(small, inputs)) < 1e-5
    if "target_kept_flops" in target:
        assert count_flops(small, inputs) <= 0.5 * count_flops(model, inputs) + 1e-6


def test_a_layer_whose_count_is_not_a_multiple_keeps_it_or_goes_to_one():
    from hf_oto.optim.selection import GroupSelector

    model, inputs = build("bert-qa")             # 6 heads per layer, 96 neurons
    groups = find_groups(model, inputs)
    selector = GroupSelector(groups, SelectionConfig(group_divisible=4))
    heads = torch.tensor([g.kind == "head" for g in groups])
    importance = torch.where(heads, torch.zeros(len(groups)), torch.ones(len(groups))).double()
    none = torch.zeros(len(groups), dtype=torch.bool)
    chosen = selector.choose(3, importance, torch.zeros(len(groups)), groups.prunable_mask, none)
    kept, total = _kept_per_layer(groups, chosen)
    # 3 heads asked for: each layer can only go from 6 to 4, so two layers give 2 each (4 removed).
    assert int(chosen.sum()) == 4 and int(chosen[heads].sum()) == 4
    assert sorted(kept[kept < total].tolist()) == [4, 4]


@pytest.mark.parametrize("name, target", [("bert-qa", dict(target_kept_flops=0.5)),
                                          ("vgg-bn", dict(target_group_sparsity=0.5)),
                                          ("llama-gqa", dict(target_kept_params=0.7))])
def test_width_multiple_aligns_the_kept_widths_not_the_head_counts(name, target):
    from hf_oto.measure import unaligned_widths
    from hf_oto.optim.selection import GroupSelector

    model, inputs = build(name)
    groups = find_groups(model, inputs)
    selector = GroupSelector(groups, SelectionConfig(width_multiple=8))
    widths = groups.group_widths()
    block = selector.block
    for b in block[block >= 0].unique().tolist():
        width = int(widths[block == b][0])
        assert int(selector.block_multiple[b]) == 8 // math.gcd(8, width)
    model.train()
    opt = create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=1e-3, start_pruning_step=2,
                               pruning_steps=6, pruning_periods=3, width_multiple=8, **target)
    _train_on_noise(model, opt, inputs, 10)
    removed = opt.zero_groups() & groups.prunable_mask
    assert removed.any() and opt.pruning_finished
    model.eval()
    before = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(before, outputs(small, inputs)) < 1e-5
    assert unaligned_widths(model, small) == []
    kept, total = _kept_per_layer(groups, removed)
    multiple = torch.zeros_like(total)
    multiple[block[block >= 0]] = selector.block_multiple[block[block >= 0]]
    touched = (kept < total) & (multiple > 0)
    assert touched.any() and (kept[touched] % multiple[touched] == 0).all()


def test_width_multiple_lets_wide_heads_go_one_by_one():
    from hf_oto.optim.selection import GroupSelector

    model, inputs = build("bert-qa")             # 6 heads per layer, each at least 8 wide
    groups = find_groups(model, inputs)
    heads = torch.tensor([g.kind == "head" for g in groups])
    assert (groups.group_widths()[heads] % 8 == 0).all()
    importance = torch.where(heads, torch.zeros(len(groups)), torch.ones(len(groups))).double()
    none = torch.zeros(len(groups), dtype=torch.bool)
    by_count = GroupSelector(groups, SelectionConfig(group_divisible=8)).choose(
        3, importance, torch.zeros(len(groups)), groups.prunable_mask, none)
    by_width = GroupSelector(groups, SelectionConfig(width_multiple=8)).choose(
        3, importance, torch.zeros(len(groups)), groups.prunable_mask, none)
    assert int(by_width.sum()) == 3 and int(by_width[heads].sum()) == 3
    assert not by_count[heads].any()             # 6 heads cannot keep a multiple of 8: left whole


# -- arguments ------------------------------------------------------------------------------------


def test_selection_arguments_are_checked_with_clear_errors():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    ok = dict(lr=1e-3, pruning_steps=10)
    cases = [
        (dict(saliency="snip"), "unknown saliency 'snip'"),
        (dict(target_kept_flops=0.0), r"target_kept_flops must be in \(0.0, 1.0\]"),
        (dict(target_kept_flops=1.5), r"target_kept_flops must be in \(0.0, 1.0\]"),
        (dict(target_kept_params=-1), r"target_kept_params must be in"),
        (dict(target_kept_flops=0.5, target_kept_params=0.5), "set one target"),
        (dict(target_kept_flops=0.5, target_group_sparsity=0.3), "set one target: target_group_sparsity=0.3"),
        (dict(group_divisible=0), "group_divisible must be an integer >= 1"),
        (dict(group_divisible=2.5), "group_divisible must be an integer >= 1"),
        (dict(width_multiple=0), "width_multiple must be an integer >= 1"),
        (dict(target_kept_flops=0.05, width_multiple=64), "or kept by width_multiple=64"),
        (dict(saliency_steps=0), "saliency_steps must be >= 1"),
        (dict(method="hspg", saliency="taylor"), "hspg does not take saliency"),
        (dict(method="hspg", target_kept_flops=0.5), "hspg does not take target_kept_flops"),
        (dict(target_kept_flops=0.01), "target_kept_flops=0.01 cannot be met"),
        (dict(target_group_sparsity=0.9, group_divisible=64), "target_group_sparsity=0.9 cannot be met"),
        (dict(bogus_option=1), "hesso does not take bogus_option"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            create_oto_optimizer(model, groups, **{**ok, **extra})
    groups.example_inputs = None
    with pytest.raises(ValueError, match="counting FLOPs needs example inputs"):
        create_oto_optimizer(model, groups, target_kept_flops=0.5, **ok)
    create_oto_optimizer(model, groups, target_kept_flops=0.5, example_inputs=inputs, **ok)  # given: fine


def test_resume_keeps_the_accumulated_scores_and_the_cost_selection_bit_exact():
    import io

    def fresh():
        model, inputs = build("bert-qa")
        groups = find_groups(model, inputs)
        return model, create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=1e-3,
                                           start_pruning_step=3, pruning_steps=6, pruning_periods=3,
                                           target_kept_flops=0.6, saliency="taylor", group_divisible=2)

    model, opt = fresh()
    _train(model, opt, "bert-qa", range(10))
    straight = [p.detach().clone() for p in model.parameters()]
    model, opt = fresh()
    # Step 3 selects (and starts accumulating afresh), step 4 adds one batch of the two that the
    # selection at step 5 reads: stopped there, the scores are half accumulated.
    _train(model, opt, "bert-qa", range(5))
    assert opt._oto["saliency_batches"] > 0
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(model, opt, "bert-qa", range(5, 10))
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["oto"]["config"]["selection"]["target_kept_flops"] == 0.6
