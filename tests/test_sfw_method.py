"""The "sfw" CompressionMethod, driven by hand and by a transformers Trainer."""

import os
import warnings

import pytest
import torch
from torch import nn

import hf_oto
from hf_oto import find_groups
from hf_oto.compress.hf_oto_layers_lowrank import LowRankLinear
from hf_oto.methods import TrainingSettings, available_methods, get_method
from hf_oto.methods.sfw import SFWMethod
from hf_oto.optim.sfw import SFW
from hf_oto.testing.zoo import build


def test_registered_under_sfw_and_inexact():
    assert "sfw" in available_methods()
    assert get_method("sfw") is SFWMethod
    assert SFWMethod.exact is False and SFWMethod.needs_groups is True


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown sfw options"):
        SFWMethod(prune_rate=0.5)
    with pytest.raises(ValueError, match="prune_ratio"):
        SFWMethod(prune_ratio=1.0)
    with pytest.raises(ValueError, match="rank_ratio"):
        SFWMethod(rank_ratio=-0.2)
    with pytest.raises(ValueError, match="structure"):
        SFWMethod(structure="heads")
    method = SFWMethod(k=0.2)
    model, inputs = build("bert-seq-cls")
    with pytest.raises(ValueError, match="k as a fraction"):
        method.create_optimizer(model, find_groups(model, inputs), TrainingSettings(learning_rate=0.1,
                                                                                    options={"k": 2.0}))


def _train(model, opt, steps, seed=0):
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        out = model(input_ids=torch.randint(0, 120, (4, 10), generator=g), labels=torch.randint(0, 3, (4,), generator=g))
        out.loss.backward()
        opt.step()
    model.eval()


def test_hooks_by_hand_prune_then_low_rank():
    model, inputs = build("bert-seq-cls")
    groups = find_groups(model, inputs)
    method = SFWMethod(prune_ratio=0.5)
    settings = TrainingSettings(learning_rate=0.5, weight_decay=0.01,
                                options={"radius_factor": 2.0, "rank_ratio": 0.6})
    opt = method.create_optimizer(model, groups, settings)
    assert isinstance(opt, SFW) and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["constraint"] == "group_k_support"
    _train(model, opt, 3)
    assert opt.contains()
    metrics = method.metrics(model, groups)
    assert 0 < metrics["sfw_step_size"] <= 1 and 0 < metrics["sfw_group_energy_kept"] <= 1
    small = method.finalize(model, groups)
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    assert any(isinstance(m, LowRankLinear) for m in small.modules())
    widths = lambda m: sum(layer.attention.self.query.out_features + layer.intermediate.dense.out_features  # noqa: E731
                           for layer in m.bert.encoder.layer)
    assert widths(small) < widths(model)                            # groups were pruned before low rank
    state = method.state_dict()
    again = SFWMethod()
    again.load_state_dict(state)
    assert again.options == method.options


def test_no_ratio_removes_only_exactly_zero_groups():
    model, inputs = build("bert-seq-cls")
    groups = find_groups(model, inputs)
    method = SFWMethod(lr=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # lr given in the options: no tiny-lr warning
        opt = method.create_optimizer(model, groups, TrainingSettings(learning_rate=5e-5))
    assert opt.param_groups[0]["lr"] == 0.2
    _train(model, opt, 2)
    small = method.finalize(model, groups)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match="tiny"):
        SFWMethod().create_optimizer(model, groups, TrainingSettings(learning_rate=5e-5))


def test_low_rank_structure_through_a_transformers_trainer_with_checkpoint_resume(tmp_path):
    """What OTOTrainer does: the method builds the optimizer in create_optimizer; the Trainer's
    scheduler, clipping, checkpointing (optimizer.pt, weights_only) and resuming work with SFW."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StopAt(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    class MethodTrainer(Trainer):
        def __init__(self, *args, method, groups, **kwargs):
            super().__init__(*args, **kwargs)
            self.method, self.groups = method, groups

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                settings = TrainingSettings(learning_rate=self.args.learning_rate, total_steps=self.args.max_steps,
                                            options={"structure": "low_rank", "k": 0.25, "radius_factor": 2.0})
                self.optimizer = self.method.create_optimizer(self.model, self.groups, settings)
            return self.optimizer

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 120, (32, 10), generator=g).tolist(),
                              "labels": torch.randint(0, 3, (32,), generator=g).tolist()})

    def run(output, resume=None, stop=None):
        model, inputs = build("bert-seq-cls")
        groups = find_groups(model, inputs)
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=4, max_steps=8,
                                 learning_rate=0.5, lr_scheduler_type="linear", save_steps=4, save_strategy="steps",
                                 logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
                                 disable_tqdm=True, dataloader_num_workers=0)
        method = get_method("sfw")(rank_ratio=0.5)
        trainer = MethodTrainer(model=model, args=args, train_dataset=data, method=method, groups=groups,
                                callbacks=[StopAt(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, method, groups

    straight, method, groups = run(tmp_path / "a")
    opt = straight.optimizer.optimizer if hasattr(straight.optimizer, "optimizer") else straight.optimizer
    assert isinstance(opt, SFW) and opt.contains()
    assert {s.name for s, _ in opt.constraint_sets()} == {"k_support_nuclear", "l2"}
    assert opt.param_groups[0]["lr"] < 0.5 * 0.2                      # the linear schedule decayed it
    run(tmp_path / "b", stop=4)                                      # interrupted after checkpoint-4
    resumed, _, _ = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    small = method.finalize(straight.model.eval(), groups)
    assert any(isinstance(m, LowRankLinear) for m in small.modules())
    small.save_pretrained(tmp_path / "small")
    again = hf_oto.from_pretrained(tmp_path / "small")
    x = torch.randint(0, 120, (2, 10))
    assert torch.equal(small(input_ids=x).logits, again.eval()(input_ids=x).logits)
    assert os.path.isfile(tmp_path / "b" / "checkpoint-4" / "optimizer.pt")


def test_per_layer_pruning_takes_the_same_share_of_every_layer():
    from hf_oto.compress import smallest_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(100.0)            # layer 0's neurons dwarf layer 2's in a global ranking
    groups = find_groups(model, (torch.randn(2, 6),))
    params = groups.parameters(model)
    norms = groups.norms(params).detach()
    mask = smallest_groups(groups, params, 0.5, scope="layer")
    for layer, n in (("0", 10), ("2", 8)):
        members = [g.index for g in groups if g.prunable and f"{layer}.weight" in _rows_of(groups, g.index)]
        assert len(members) == n
        removed = [i for i in members if mask[i]]
        assert len(removed) == n // 2
        assert max(norms[removed]) <= min(norms[[i for i in members if not mask[i]]])
    method = SFWMethod(prune_ratio=0.5, prune_scope="layer")
    small = method.finalize(model, groups)
    assert (small[0].out_features, small[2].out_features) == (5, 4)
    # one global ranking empties layer 2 instead (one neuron is always kept)
    assert hf_oto.compress(model, groups, ratio=0.5)[2].out_features == 1
    with pytest.raises(ValueError, match="prune_scope"):
        SFWMethod(prune_scope="block")


def _rows_of(groups, index):
    return {s.tensor for s in groups.slices if s.dim == 0 and bool((s.group == index).any())}
