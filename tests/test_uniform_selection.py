"""Layer-uniform selection: every layer of a family keeps the same number of groups."""

import pytest
import torch

from hf_oto import OTOTrainingArguments, compress, find_groups
from hf_oto.measure import count_flops
from hf_oto.optim import create_oto_optimizer
from hf_oto.optim.selection import GroupSelector, SelectionConfig, _blocks, _families
from hf_oto.testing.zoo import build

from helpers import outputs, relative_difference
from test_selection import _train_on_noise


def _kept_per_family(groups, removed):
    """{family: sorted list of the kept counts of its layers}."""
    block, total = _blocks(groups)
    family = _families(groups, total)
    kept = total - torch.bincount(block[removed & (block >= 0)], minlength=total.numel())
    found: dict[int, list[int]] = {}
    for layer, fam in enumerate(family.tolist()):
        found.setdefault(fam, []).append(int(kept[layer]))
    return found, family


def test_families_join_the_same_module_of_every_layer():
    model, inputs = build("llama-gqa")
    groups = find_groups(model, inputs)
    _, family = _kept_per_family(groups, torch.zeros(len(groups), dtype=torch.bool))
    layers = {}
    for g, module in zip(groups, groups.producing_layers()):
        layers.setdefault((module, g.kind), None)
    names = list(layers)
    by_family = {}
    for (module, kind), fam in zip(names, family.tolist()):
        by_family.setdefault(fam, []).append(module)
    assert sorted(by_family.values()) == sorted([
        ["model.layers.0.self_attn.o_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"], ["lm_head"]])


@pytest.mark.parametrize("divisible", [1, 4])
@pytest.mark.parametrize("name", ["bert-qa", "llama-gqa", "gpt2"])
def test_the_selector_removes_the_same_count_from_every_layer_of_a_family(name, divisible):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    selector = GroupSelector(groups, SelectionConfig(uniform_layers=True, group_divisible=divisible))
    importance = torch.rand(len(groups), generator=torch.Generator().manual_seed(0)).double()
    none = torch.zeros(len(groups), dtype=torch.bool)
    budget = int(0.4 * groups.num_prunable)
    chosen = selector.choose(budget, importance, torch.zeros(len(groups)), groups.prunable_mask, none)
    assert int(chosen.sum()) >= budget
    kept, _ = _kept_per_family(groups, chosen)
    assert all(len(set(counts)) == 1 for counts in kept.values()), kept
    block, total = _blocks(groups)
    full = {int(t) for t in total}
    assert any(c[0] not in full for c in kept.values())  # some family was cut
    if divisible > 1:
        assert all(c[0] % divisible == 0 or c[0] in full for c in kept.values())
    # Each bundle takes the least salient remaining group of every layer: within a layer, every
    # removed group scores no higher than every kept one.
    for b in block.unique().tolist():
        if b < 0:
            continue
        at = block == b
        if chosen[at].any() and (~chosen[at]).any():
            assert importance[at & chosen].max() <= importance[at & ~chosen].min()


@pytest.mark.parametrize("name, target", [("llama-gqa", dict(target_kept_flops=0.6)),
                                          ("bert-qa", dict(target_group_sparsity=0.5))])
@pytest.mark.parametrize("method", ["hesso", "dhspg"])
def test_training_with_uniform_layers_gives_uniform_layers_and_exact_compression(name, target, method):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    model.train()
    opt = create_oto_optimizer(model, groups, method=method, variant="adamw", lr=1e-3, start_pruning_step=2,
                               pruning_steps=6, pruning_periods=3, uniform_layers=True, **target)
    _train_on_noise(model, opt, inputs, 10)
    removed = opt.zero_groups() & groups.prunable_mask
    assert removed.any() and opt.pruning_finished
    kept, _ = _kept_per_family(groups, removed)
    assert all(len(set(counts)) == 1 for counts in kept.values()), kept
    model.eval()
    before = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(before, outputs(small, inputs)) < 1e-5
    if "target_kept_flops" in target:
        assert count_flops(small, inputs) <= 0.6 * count_flops(model, inputs) + 1e-6


def test_uniform_layers_is_plumbed_and_checked():
    args = OTOTrainingArguments(output_dir="out", oto_uniform_layers=True, report_to=[])
    assert args.selection().uniform_layers and args.oto_summary()["oto_uniform_layers"] is True
    with pytest.raises(ValueError, match="oto_uniform_layers applies to oto_method hesso or dhspg"):
        OTOTrainingArguments(output_dir="out", oto_uniform_layers=True, oto_method="hspg", report_to=[])
    with pytest.raises(ValueError, match="uniform_layers must be True or False"):
        SelectionConfig(uniform_layers="yes")
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    with pytest.raises(ValueError, match="hspg does not take uniform_layers"):
        create_oto_optimizer(model, groups, method="hspg", lr=1e-3, uniform_layers=True)
    opt = create_oto_optimizer(model, groups, lr=1e-3, pruning_steps=10, uniform_layers=True)
    assert opt.selection.uniform_layers


@pytest.mark.parametrize("prune_heads", [False, True])
def test_the_trainer_saves_a_uniform_model_with_a_standard_config_or_says_why_not(tmp_path, prune_heads):
    import json
    import os

    from trainer_utils import qa_data, qa_model

    from hf_oto import OTOTrainer

    data = qa_data()
    args = OTOTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=10, oto_pruning_start=2,
                                oto_pruning_end=8, oto_pruning_periods=3, learning_rate=1e-3,
                                per_device_train_batch_size=8, per_device_eval_batch_size=16, report_to=[],
                                save_strategy="no", use_cpu=True, seed=0, oto_measure_latency=False,
                                oto_uniform_layers=True, oto_prune_heads=prune_heads, oto_prune_neurons=not prune_heads,
                                target_group_sparsity=0.5)
    trainer = OTOTrainer(model=qa_model(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()  # raises if the compressed model's metrics differ from the sparse model's
    kept, _ = _kept_per_family(trainer.oto_groups, trainer.oto_method.zero_groups(trainer.model, trainer.oto_groups))
    assert all(len(set(counts)) == 1 for counts in kept.values()), kept
    assert trainer.oto_report.num_removed_groups > 0
    folder = trainer.save_compressed()
    config = json.load(open(os.path.join(folder, "config.json")))
    card = open(os.path.join(folder, "README.md")).read()
    report = json.load(open(os.path.join(folder, "oto_report.json")))
    assert report["standard_config"] is not prune_heads
    if prune_heads:  # BERT derives the head size from hidden_size / num_attention_heads
        assert "hf_oto_manifest" in config and "derives the head size" in report["standard_config_reason"]
        assert "Why not a standard config" in card and "trust_remote_code=True" in card
    else:
        assert "hf_oto_manifest" not in config and "auto_map" not in config
        assert config["intermediate_size"] < qa_model().config.intermediate_size
        assert not [f for f in os.listdir(folder) if f.endswith(".py")]
        assert "trust_remote_code" not in card and "standard `BertForQuestionAnswering` config" in card
