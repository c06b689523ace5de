"""How HESSO and DHSPG spread their target over the pruning periods: linear (the default, as published) or cubic."""

import pytest
import torch

from hf_oto import OTOTrainer, OTOTrainingArguments, compress, find_groups
from hf_oto.measure import count_flops
from hf_oto.optim import create_oto_optimizer
from hf_oto.optim.selection import SelectionConfig, schedule_fraction
from hf_oto.optim.windowed import cumulative_targets
from hf_oto.testing.zoo import build
from trainer_utils import qa_data, qa_model
from transformers import TrainerCallback

from helpers import outputs, relative_difference
from test_selection import _train_on_noise


def test_cumulative_targets_linear_is_unchanged_and_cubic_front_loads():
    assert cumulative_targets(11, 3) == [3, 7, 11]
    assert cumulative_targets(11, 3, "linear") == [3, 7, 11]
    for total, periods in ((100, 10), (7, 3), (3, 10), (0, 4), (1000, 1)):
        cubic = cumulative_targets(total, periods, "cubic")
        linear = cumulative_targets(total, periods)
        assert cubic[-1] == total and len(cubic) == periods
        assert all(a <= b for a, b in zip(cubic, cubic[1:]))             # never re-admits a group
        assert all(c >= lin for c, lin in zip(cubic, linear))            # at least as far along as linear
    assert cumulative_targets(100, 10, "cubic")[:4] == [27, 48, 65, 78]   # 1 - (1 - p/10)^3
    assert schedule_fraction("cubic", 9, 10) == 1.0 and schedule_fraction("linear", 4, 10) == 0.5


def _zero_counts_at_period_ends(schedule, method="hesso", **extra):
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    model.train()
    opt = create_oto_optimizer(model, groups, method=method, variant="adamw", lr=1e-3, target_group_sparsity=0.5,
                               start_pruning_step=2, pruning_steps=12, pruning_periods=4,
                               pruning_schedule=schedule, **extra)
    counts = []
    for step in range(16):
        _train_on_noise(model, opt, inputs, 1)
        if step >= 2 and (step - 2) % 3 == 2:   # the last step of each 3-step period
            counts.append(int(opt.zero_groups().sum()))
    return model, inputs, groups, opt, counts


@pytest.mark.parametrize("method", ["hesso", "dhspg"])
def test_each_period_ends_at_the_cubic_count_and_the_model_compresses_exactly(method):
    model, inputs, groups, opt, counts = _zero_counts_at_period_ends("cubic", method)
    k = opt.target_num_zero_groups
    assert k == int(0.5 * groups.num_prunable)
    assert counts == cumulative_targets(k, 4, "cubic")
    assert counts[0] > cumulative_targets(k, 4)[0]                         # front-loaded, not linear
    model.eval()
    before = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(before, outputs(small, inputs)) < 1e-5


def test_a_flops_target_is_front_loaded_and_met():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    model.train()
    plans = {}
    for schedule in ("linear", "cubic"):
        torch.manual_seed(0)
        model, inputs = build("bert-qa")
        model.train()
        opt = create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=1e-3, target_kept_flops=0.6,
                                   start_pruning_step=2, pruning_steps=8, pruning_periods=4,
                                   pruning_schedule=schedule)
        _train_on_noise(model, opt, inputs, 3)   # the first period's selection has run
        plans[schedule] = opt.metrics()["planned_kept_flops"]
        _train_on_noise(model, opt, inputs, 9)
        model.eval()
        dense = count_flops(model, inputs)
        kept = count_flops(compress(model, groups), inputs) / dense
        assert 0.5 < kept <= 0.6 + 1e-9
    # A quarter of the removal (linear) against 1 - (3/4)^3 = 58% of it (cubic).
    assert plans["linear"] == pytest.approx(1 - 0.4 * 0.25, abs=0.03)
    assert plans["cubic"] == pytest.approx(1 - 0.4 * 0.578, abs=0.03)


def test_the_schedule_is_checked_saved_and_reaches_the_trainer():
    with pytest.raises(ValueError, match="unknown pruning_schedule 'exponential'"):
        SelectionConfig(pruning_schedule="exponential")
    with pytest.raises(ValueError, match="unknown pruning_schedule"):
        OTOTrainingArguments(output_dir="out", oto_pruning_schedule="quadratic")
    with pytest.raises(ValueError, match="oto_pruning_schedule applies to oto_method hesso or dhspg, not 'sfw'"):
        OTOTrainingArguments(output_dir="out", oto_method="sfw", oto_pruning_schedule="cubic")
    OTOTrainingArguments(output_dir="out", oto_method="sfw")  # the default schedule is no request
    assert OTOTrainingArguments(output_dir="out").selection().pruning_schedule == "linear"  # the default
    assert SelectionConfig().pruning_schedule == "linear"
    args = OTOTrainingArguments(output_dir="out", oto_pruning_schedule="cubic")
    assert args.selection().pruning_schedule == "cubic"
    assert SelectionConfig.from_dict(SelectionConfig(pruning_schedule="cubic").to_dict()).pruning_schedule == "cubic"
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    opt = create_oto_optimizer(model, groups, method="hesso", pruning_steps=4, pruning_periods=2,
                               pruning_schedule="cubic")
    assert opt.state_dict()["oto"]["config"]["selection"]["pruning_schedule"] == "cubic"
    with pytest.raises(ValueError, match="hspg does not take pruning_schedule"):
        create_oto_optimizer(model, groups, method="hspg", pruning_schedule="cubic")


class _ZeroCounts(TrainerCallback):
    def __init__(self):
        self.counts = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        self.counts[state.global_step] = int(opt.zero_groups().sum())


def test_the_trainer_follows_the_cubic_schedule(tmp_path):
    """OTOTrainer hands oto_pruning_schedule to HESSO: after the first of 3 periods the model has
    the cubic count of zero groups (70% of the target, against a third with linear)."""
    recorder = _ZeroCounts()
    data = qa_data()
    args = OTOTrainingArguments(output_dir=str(tmp_path / "out"), oto_method="hesso", max_steps=10,
                                oto_pruning_start=1, oto_pruning_end=10, oto_pruning_periods=3,
                                oto_pruning_schedule="cubic", target_group_sparsity=0.5, learning_rate=1e-3,
                                per_device_train_batch_size=8, per_device_eval_batch_size=16, report_to=[],
                                save_strategy="no", use_cpu=True, seed=0, oto_measure_latency=False)
    trainer = OTOTrainer(model=qa_model(), args=args, train_dataset=data, eval_dataset=data, callbacks=[recorder])
    trainer.train()  # raises if the compressed model's metrics differ from the sparse model's
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert opt.selection.pruning_schedule == "cubic"
    k = opt.target_num_zero_groups
    assert recorder.counts[4] == cumulative_targets(k, 3, "cubic")[0] > cumulative_targets(k, 3)[0]
    assert recorder.counts[10] == k == trainer.oto_report.num_removed_groups
