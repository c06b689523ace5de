"""Mixture of experts: per-expert neurons and whole experts are zero-invariant groups, and
compress removes them exactly (generate() too), with a reload in a fresh process."""

import pytest
import torch
from helpers import (num_params, outputs, relative_difference, reload_in_fresh_process, save_reference,
                     zero_random_groups)

import hf_oto
from hf_oto import GroupConfig, compress, find_groups
from hf_oto.testing.zoo import build

MOE = ["mixtral-moe", "qwen2-moe"]


def _experts(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _build(name, implementation="grouped_mm"):
    model, inputs = build(name)
    model.config._experts_implementation = implementation
    return model, inputs


@pytest.mark.parametrize("name", MOE)
def test_each_expert_neuron_is_a_group(name):
    model, inputs = _build(name)
    groups = find_groups(model, inputs)
    cfg = model.config
    experts, ffn = _experts(model)[0].num_experts, _experts(model)[0].intermediate_dim
    hidden = cfg.hidden_size
    expert_neurons = [g for g in groups if g.kind == "neuron" and g.layer.endswith("mlp.experts")]
    assert len(expert_neurons) == cfg.num_hidden_layers * experts * ffn
    assert all(g.prunable and g.num_params == 3 * hidden for g in expert_neurons)  # gate row, up row, down column
    # Whole experts are found but stay unprunable unless asked for.
    whole = [g for g in groups if g.kind == "expert"]
    assert len(whole) == cfg.num_hidden_layers * experts
    assert not any(g.prunable for g in whole) and "prune_experts" in whole[0].reason
    # One group covers exactly row j and row ffn + j of one expert's gate_up_proj, column j of its down_proj.
    g = expert_neurons[5]
    layer = g.layer
    gate_up = dict(model.named_parameters())[layer + ".gate_up_proj"]
    touched = torch.zeros_like(gate_up, dtype=torch.bool)
    for s in groups.slices:
        if s.tensor == layer + ".gate_up_proj" and s.outer is not None:
            hit = s.group == g.index
            touched[s.outer[hit], s.index[hit]] = True
    experts_hit, rows = touched.any(-1).nonzero(as_tuple=True)
    assert experts_hit.unique().numel() == 1 and rows.tolist() == [rows[0].item(), rows[0].item() + ffn]


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", MOE)
def test_compress_expert_neurons_exact_and_reload_in_fresh_process(name, implementation, tmp_path):
    model, inputs = _build(name, implementation)
    groups = find_groups(model, inputs)
    mask = zero_random_groups(model, groups, 0.4, seed=1)
    reference = outputs(model, inputs)
    before = num_params(model)

    small = compress(model, groups)

    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    assert num_params(small) == before - groups.removed_param_count(groups.feasible_removal(mask))
    assert num_params(small) < before
    for experts in _experts(small):
        # Experts keep different neuron counts: one width for all, the narrower ones zero-padded.
        width = experts.down_proj.shape[-1]
        kept = (experts.down_proj != 0).any(1).sum(-1)  # per expert: its kept neurons
        assert kept.min() < kept.max() and width == min(32, -(-int(kept.max()) // 8) * 8)
        assert experts.gate_up_proj.shape[1] == 2 * width
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = inputs["input_ids"][:1, :5]
    assert torch.equal(small.generate(ids, **kwargs), model.generate(ids, **kwargs))

    _assert_reload_exact(small, inputs, implementation, tmp_path)


def _assert_reload_exact(small, inputs, implementation, path):
    """The experts implementation is chosen at load time (not saved): a fresh process loads with
    the default (grouped_mm); other implementations are checked by loading with them here."""
    small.save_pretrained(path)
    if implementation == "grouped_mm":
        save_reference(small, inputs, path)
        assert reload_in_fresh_process([path], cwd=path.parent)[str(path)]["worst"] == 0.0
    else:
        again = hf_oto.from_pretrained(path, experts_implementation=implementation)
        assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0.0


def _routed_ids(model, inputs) -> torch.Tensor:
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].flatten())) for m in _experts(model)]
    outputs(model, inputs)
    for h in hooks:
        h.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", MOE)
def test_whole_experts_removed_exactly_with_routing_kept(name, implementation, tmp_path):
    model, inputs = _build(name, implementation)
    groups = find_groups(model, inputs, GroupConfig(prune_experts=True))
    whole = [g for g in groups if g.kind == "expert"]
    assert whole and all(g.prunable and g.exact for g in whole)
    # The group holds the expert's slices of every expert tensor and its router row.
    touched = {s.tensor.rpartition(".")[2] for s in groups.slices if (s.group == whole[0].index).any()}
    assert {"gate_up_proj", "down_proj", "weight"} <= touched
    experts_per_layer = _experts(model)[0].num_experts
    remove = torch.zeros(len(groups), dtype=torch.bool)
    remove[[whole[1].index, whole[experts_per_layer + 2].index]] = True  # one expert in each layer
    with torch.no_grad():
        groups.zero_(groups.parameters(model), remove)
    # The zeroed experts keep a router logit of 0 and still win top-k slots: dropping them from
    # the router would reroute those tokens (and, without renormalisation, change every weight).
    assert (_routed_ids(model, inputs)[0] == 1).any()
    reference = outputs(model, inputs)
    router_before = {n: p.shape for n, p in model.named_parameters() if n.endswith("gate.weight")}

    small = compress(model, groups)

    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    assert [e.num_experts for e in _experts(small)] == [experts_per_layer - 1] * 2
    assert [e.gate_up_proj.shape[0] for e in _experts(small)] == [experts_per_layer - 1] * 2
    assert {n: p.shape for n, p in small.named_parameters() if n.endswith("gate.weight")} == router_before
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = inputs["input_ids"][:1, :5]
    assert torch.equal(small.generate(ids, **kwargs), model.generate(ids, **kwargs))

    _assert_reload_exact(small, inputs, implementation, tmp_path)


def test_experts_and_their_neurons_removed_together():
    model, inputs = _build("mixtral-moe")
    groups = find_groups(model, inputs, GroupConfig(prune_experts=True))
    mask = zero_random_groups(model, groups, 0.4, seed=7)
    assert mask[[g.index for g in groups if g.kind == "expert"]].any()
    reference = outputs(model, inputs)
    before = num_params(model)
    small = compress(model, groups)
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    assert num_params(small) == before - groups.removed_param_count(groups.feasible_removal(mask))


def test_eager_experts_loop_groups_neurons_across_experts():
    """The Python loop over experts (experts_implementation="eager") reads each expert by a plain
    index: a neuron is then row j of every expert, which is still exact."""
    model, inputs = _build("mixtral-moe", "eager")
    groups = find_groups(model, inputs)
    ffn = _experts(model)[0].intermediate_dim
    neurons = [g for g in groups if g.kind == "neuron" and g.layer.endswith("mlp.experts")]
    assert len(neurons) == model.config.num_hidden_layers * ffn and all(g.prunable for g in neurons)
    zero_random_groups(model, groups, 0.4, seed=2)
    reference = outputs(model, inputs)
    assert relative_difference(reference, outputs(compress(model, groups), inputs)) <= 1e-5


@pytest.mark.parametrize("method,options", [("hesso", {}), ("hesso", {"saliency": "mixed"}), ("dhspg", {}),
                                            ("hesso", {"target_kept_flops": 0.85})])
def test_training_prunes_per_expert_groups_and_compress_is_exact(method, options):
    """Every step kind on per-expert grids: loss saliency (default), the published mix, DHSPG's
    subgradient trial step, FLOPs costs of expert groups."""
    from hf_oto.measure import count_flops
    from hf_oto.optim import create_oto_optimizer

    model, inputs = _build("mixtral-moe")
    groups = find_groups(model, inputs, GroupConfig(prune_experts=True))
    model.train()
    target = {} if "target_kept_flops" in options else {"target_group_sparsity": 0.3}
    opt = create_oto_optimizer(model, groups, method=method, variant="adam", lr=1e-2, start_pruning_step=1,
                               pruning_steps=4, pruning_periods=2, **target, **options)
    dense_flops = count_flops(model, inputs)
    for _ in range(6):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    zero = groups.zero_mask(groups.parameters(model)) & groups.prunable_mask
    if target:
        assert int(zero.sum()) == int(0.3 * groups.num_prunable)
    kinds = {groups[i].kind for i in zero.nonzero().flatten().tolist()}
    assert "neuron" in kinds
    reference = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    if not target:
        assert count_flops(small, inputs) <= 0.85 * dense_flops
    assert num_params(small) < num_params(model)


@pytest.mark.parametrize("name", MOE)
def test_widths_grouped_mm_reads_keep_a_multiple_of_8(name):
    """``aten._grouped_mm`` wants 16-byte aligned strides: with the residual width prunable, 12 of
    the 48 hidden dims zeroed leaves 36, which the kernel refuses; compress keeps 4 zero ones (40),
    exact, where it used to fail. Per-expert neurons are padded separately and need no flag."""
    model, inputs = _build(name, "grouped_mm")
    groups = find_groups(model, inputs, GroupConfig(prune_hidden=True))
    hidden = torch.tensor([g.kind == "hidden" and g.prunable for g in groups])
    width = model.config.hidden_size
    assert int(hidden.sum()) == width and width % 8 == 0
    assert all(groups[i].kept_multiple == 8 for i in hidden.nonzero().flatten().tolist())
    assert all(g.kept_multiple == 1 for g in groups if g.layer.endswith("mlp.experts") and g.kind == "neuron")
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[hidden.nonzero().flatten()[:12]] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    kept = groups.feasible_removal(mask)
    assert int(kept.sum()) == 8 and bool((kept <= mask).all())    # 4 of the 12 stay, zero
    small = compress(model, groups)  # raises if the outputs differ
    assert small.get_input_embeddings().weight.shape[1] == width - 8
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) < 1e-5


@pytest.mark.parametrize("name", MOE)
def test_a_flops_target_plans_the_aligned_widths_grouped_mm_reads(name):
    """With a FLOPs target the selection keeps the residual width a multiple of 8 itself, so
    compress keeps no zero group beyond the plan and the target holds (it used to land up to 7
    hidden dims above it)."""
    from hf_oto.measure import count_flops
    from hf_oto.optim import create_oto_optimizer
    from hf_oto.optim.selection import GroupSelector, SelectionConfig

    from hf_oto.costs import GroupCosts

    model, inputs = _build(name, "grouped_mm")
    # Only the residual width prunable: the target has to come from it.
    groups = find_groups(model, inputs, GroupConfig(prune_hidden=True, prune_heads=False, prune_neurons=False))
    hidden = torch.tensor([g.kind == "hidden" and g.prunable for g in groups])
    assert bool((hidden == groups.prunable_mask).all())

    costs = GroupCosts.measure(model, groups, inputs, units=("flops",))
    selector = GroupSelector(groups, SelectionConfig(target_kept_flops=0.6), costs)
    if hasattr(selector, "bundled"):
        assert selector.bundled and int(selector.block_multiple[selector.block[hidden][0]]) == 8
        assert not GroupSelector(groups, SelectionConfig()).bundled  # a group target stays exact
    model.train()
    opt = create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=1e-3, start_pruning_step=2,
                               pruning_steps=6, pruning_periods=3, target_kept_flops=0.6, saliency="magnitude")
    for _ in range(10):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    removed = opt.zero_groups() & groups.prunable_mask
    assert bool((removed & hidden).any()) and opt.pruning_finished
    assert torch.equal(groups.feasible_removal(removed), removed)  # nothing kept beyond the plan
    assert int((removed & hidden).sum()) % 8 == 0
    model.eval()
    small = compress(model, groups)
    assert count_flops(small, inputs) <= 0.6 * count_flops(model, inputs) + 1e-6
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) < 1e-5


def test_expert_edits_keep_input_cuts_on_their_heads():
    """The MoE pass renumbers groups (router rows merge into their experts); arguments cut per head
    (ALiBi slopes here) must still name the same heads afterwards, or compress leaves them whole."""
    import transformers

    from hf_oto.graph.moe_rules import _GroupEdit

    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2,
                                                                   n_head=4)).eval()
    groups = find_groups(model, {"input_ids": torch.randint(1, 64, (2, 8))})
    assert groups.input_cuts
    edit = _GroupEdit(groups)
    edit.merge_kept({0: 1})  # group 0 folds into group 1: every later group moves down by one
    edited = edit.result([], [])
    assert len(edited) == len(groups) - 1
    assert len(edited.input_cuts) == len(groups.input_cuts)
    for before, after in zip(groups.input_cuts, edited.input_cuts):
        assert (before.module, before.name, before.dim) == (after.module, after.name, after.dim)
        assert torch.equal(after.group, before.group - 1)
        assert all(edited[int(a)].layer == groups[int(b)].layer and edited[int(a)].kind == "head"
                   for a, b in zip(after.group, before.group))
