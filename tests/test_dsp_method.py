"""The DSP method: group learning, the FLOPs target, the schedule, bad settings and resuming."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import outputs, relative_difference
from torch import nn

from hf_oto import find_groups
from hf_oto.methods import get_method
from hf_oto.methods.base import TrainingSettings
from hf_oto.methods.dsp import (
    DSP,
    LOGITS,
    DSPConfig,
    block_penalty,
    filter_channel_energy,
    hard_assignment,
    plan_layer,
    soft_assignment,
)
from hf_oto.measure import count_flops
from hf_oto.testing.zoo import build


pytestmark = pytest.mark.usefixtures("one_thread")


def _clustered_weight(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """24 filters in 3 shuffled clusters; cluster k draws on input channels [8k, 8k + 8)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 24, generator=gen) * 0.01
    cluster = torch.arange(24) % 3
    for f in range(24):
        weight[f, 8 * cluster[f]:8 * cluster[f] + 8] = torch.randn(8, generator=gen)
    perm = torch.randperm(24, generator=gen)
    return weight[perm], cluster[perm]


def _purity(assignment: torch.Tensor, cluster: torch.Tensor) -> float:
    return sum(int(torch.bincount(cluster[assignment == g], minlength=3).max())
               for g in assignment.unique()) / len(cluster)


@pytest.mark.parametrize("seed", [0, 1])
def test_penalty_groups_filters_that_share_inputs(seed):
    """Minimising the block penalty over the logits alone sorts filters by the channels they use;
    the extra candidate group merges away at conversion, so the layer ends with 3 groups."""
    weight, cluster = _clustered_weight(seed)
    energy = filter_channel_energy(weight)
    logits = nn.Parameter(torch.randn(4, 24, generator=torch.Generator().manual_seed(seed)) * 0.01)
    assert _purity(hard_assignment(logits), cluster) < 1.0  # random start mixes clusters
    opt = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for t in range(200):
        membership = soft_assignment(logits, 0.05 ** (t / 200), gumbel=True, generator=gen)
        loss = block_penalty(energy, membership, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assignment = hard_assignment(logits)
    assert _purity(assignment, cluster) == 1.0
    pruned = weight * (weight.abs() > 0.1)  # what the penalty and hardening leave
    plan = plan_layer("layer", pruned, assignment)
    assert len(plan.filters) == 3
    assert sorted(len(c) for c in plan.channels) == [8, 8, 8]


def _train(model, inputs, method, steps, groups=None, batch=None, lr=1e-3, start=1, optimizer=None):
    """The trainer's protocol, by hand: loss + regularizer, step, on_step_end."""
    if optimizer is None:
        optimizer = method.create_optimizer(model, groups, TrainingSettings(learning_rate=lr, total_steps=steps))
    x = inputs[0] if isinstance(inputs, tuple) else inputs["pixel_values"]
    gen = torch.Generator().manual_seed(start)
    torch.manual_seed(start)  # dropout
    model.train()
    for step in range(start, steps + 1):
        xb = x + 0.1 * torch.randn(x.shape, generator=gen)
        out = model(xb) if isinstance(inputs, tuple) else model(pixel_values=xb).logits
        loss = F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])
        reg = method.regularizer(model)
        if reg is not None:
            loss = loss + reg
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.on_step_end(model, step)
    model.eval()
    return optimizer


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_learned_grouping_reaches_the_flops_target(target):
    model, inputs = build("vgg-bn")
    groups = find_groups(model, inputs)
    method = DSP(max_groups=4, flops_reduction=target, penalty=1e-2)
    method.prepare(model, groups)
    assert set(method.skipped) == {"features.0.0"}  # the RGB stem: too few input channels
    _train(model, inputs, method, steps=16, groups=groups)
    assert method.hardened and method.step == 16
    # The target rounded up to the next block, and the structure in the weights says the same.
    assert target <= method.reached <= target + 0.02
    assert method.flops_reduction(model) == pytest.approx(method.reached)
    small = method.finalize(model, groups)
    measured = 1 - count_flops(small, inputs) / count_flops(model, inputs)
    assert target <= measured <= target + 0.03
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5
    assert not any(LOGITS in name for name, _ in small.named_parameters())
    # The method chose how many groups each layer keeps (at most max_groups).
    assert all(1 <= len(e.groups) <= 4 for e in method.report)


def test_schedule_anneals_then_holds_pruned_blocks_at_zero():
    model, inputs = build("vgg-bn")
    method = DSP(max_groups=2, flops_reduction=0.4, harden_at=0.5, total_steps=8, example_inputs=inputs)
    method.prepare(model, None)
    assert method.harden_step == 4
    temps, penalties = [], []
    optimizer = method.create_optimizer(model, None, TrainingSettings(learning_rate=1e-3))
    for step in range(0, 4):
        method.step = step
        temps.append(method.temperature)
        penalties.append(method.penalty_weight)
    assert temps == sorted(temps, reverse=True) and temps[0] == 1.0
    assert penalties == sorted(penalties) and penalties[-1] == pytest.approx(method.config.penalty)
    method.step = 0
    _train(model, inputs, method, steps=8, optimizer=optimizer)
    assert method.hardened and method.regularizer(model) is None
    for path, layer in method.layers.items():
        assert not layer._parameters[LOGITS].requires_grad
        pruned = ~method.masks[path]
        assert pruned.any()
        assert layer.weight.detach().reshape(*pruned.shape, -1)[pruned].abs().max() == 0
    metrics = method.metrics(model)
    assert metrics["dsp_hardened"] == 1.0 and metrics["dsp_flops_reduction"] >= 0.4


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_transformers_vision_models_train_and_convert_exactly(name):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    method = DSP(max_groups=2, flops_reduction=0.3, min_in_channels=2)
    method.prepare(model, groups)
    if name == "convnext":
        assert all("depthwise" in method.skipped[p] for p in method.skipped if p.endswith("dwconv"))
    _train(model, inputs, method, steps=6, groups=groups)
    small = method.finalize(model, groups)
    assert type(small).__name__.startswith("HfOto")
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5
    assert 1 - count_flops(small, inputs) / count_flops(model, inputs) >= 0.3


def test_bad_settings_fail_or_skip_with_a_reason():
    model, inputs = build("vgg-bn")
    with pytest.raises(ValueError, match="max_groups"):
        DSP(max_groups=0)
    with pytest.raises(ValueError, match="unknown DSP options"):
        DSP(groups=4)
    with pytest.raises(ValueError, match="flops_reduction"):
        DSP(flops_reduction=1.0)
    # More groups than filters: the layer is skipped, and named in the reason.
    method = DSP(max_groups=20, example_inputs=inputs, min_in_channels=2)
    method.prepare(model, None)
    assert "16 filters, fewer than max_groups=20" == method.skipped["features.1.0"]
    assert "classifier.1" in method.layers
    with pytest.raises(ValueError, match="no layer to restructure"):
        DSP(max_groups=100, example_inputs=inputs).prepare(model, None)
    with pytest.raises(ValueError, match="out of reach"):
        DSP(max_groups=4, flops_reduction=0.9, include=["classifier"], example_inputs=inputs).prepare(model, None)
    with pytest.raises(ValueError, match="example inputs"):
        DSP().prepare(build("vgg-bn")[0], None)


def test_depthwise_layers_are_skipped_and_refused_when_named():
    model, inputs = build("mobilenet-block")
    method = DSP(max_groups=2, example_inputs=inputs)
    method.prepare(model, None)
    depthwise = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all("depthwise" in method.skipped[p] for p in depthwise)
    with pytest.raises(ValueError, match="depthwise"):
        DSP(max_groups=2, include=[depthwise[0]], example_inputs=inputs).prepare(model, None)


def test_schedule_needs_a_length_and_a_target():
    model, inputs = build("vgg-bn")
    method = DSP(example_inputs=inputs)
    method.prepare(model, None)
    with pytest.raises(ValueError, match="number of training steps"):
        method.on_step_end(model, 1)
    method = DSP(harden_at=1, example_inputs=inputs)
    method.prepare(model, None)
    with pytest.raises(ValueError, match="no FLOPs target"):
        method.on_step_end(model, 1)
    with pytest.raises(RuntimeError, match="prepare"):
        DSP().regularizer(model)


def test_trainer_options_and_target():
    """Options arrive through TrainingSettings.options (oto_method_kwargs); the trainer's
    target_group_sparsity is the FLOPs target unless flops_reduction is set."""
    assert get_method("dsp") is DSP
    model, inputs = build("vgg-bn")
    method = DSP(example_inputs=inputs)
    method.prepare(model, None)
    settings = TrainingSettings(learning_rate=1e-3, weight_decay=0.01, total_steps=10, options={"max_groups": 2})
    settings.target_group_sparsity = 0.45
    optimizer = method.create_optimizer(model, None, settings)
    assert method.config.max_groups == 2 and method.target == 0.45
    assert all(m._parameters[LOGITS].shape[0] == 2 for m in method.layers.values())
    logits_group = optimizer.param_groups[-1]
    assert logits_group["lr"] == method.config.assignment_lr and logits_group["weight_decay"] == 0.0
    assert len(logits_group["params"]) == len(method.layers)
    with pytest.raises(ValueError, match="unknown DSP options"):
        method.create_optimizer(model, None, TrainingSettings(learning_rate=1e-3, options={"bogus": 1}))


def test_resume_is_bit_for_bit():
    """Stop across the hardening step, save model, optimizer and method state (JSON), resume."""
    model, inputs = build("vgg-bn")
    method = DSP(max_groups=3, flops_reduction=0.5, harden_at=4, total_steps=8, example_inputs=inputs)
    method.prepare(model, None)
    optimizer = _train(model, inputs, method, steps=3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_method = json.loads(json.dumps(method.state_dict()))
    _train(model, inputs, method, steps=8, start=4, optimizer=optimizer)

    fresh, _ = build("vgg-bn")
    resumed = DSP(max_groups=3, flops_reduction=0.5, harden_at=4, total_steps=8, example_inputs=inputs)
    resumed.load_state_dict(saved_method)  # before prepare: applied when prepared
    resumed.prepare(fresh, None)
    fresh.load_state_dict(saved_model)
    opt2 = resumed.create_optimizer(fresh, None, TrainingSettings(learning_rate=1e-3, total_steps=8))
    opt2.load_state_dict(saved_opt)
    _train(fresh, inputs, resumed, steps=8, start=4, optimizer=opt2)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed.state_dict() == method.state_dict()


def test_hf_trainer_drives_the_protocol(tmp_path):
    """A transformers Trainer calling the method's hooks where OTOTrainer does (create_optimizer,
    loss + regularizer, on_step_end), then finalize."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, inputs = build("resnet")
    groups = find_groups(model, inputs)
    method = get_method("dsp")(max_groups=2, min_in_channels=2)
    method.prepare(model, groups)
    steps = 6

    class Hooks(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            method.on_step_end(model, state.global_step)

    class ProtocolTrainer(Trainer):
        def create_optimizer(self, model=None):
            settings = TrainingSettings(learning_rate=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                        total_steps=steps, options={"flops_reduction": 0.35})
            self.optimizer = method.create_optimizer(self.model, groups, settings)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            reg = method.regularizer(model)
            if reg is None:
                return out
            return (out[0] + reg, out[1]) if return_outputs else out + reg

    gen = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=gen), "labels": i % 5} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    ProtocolTrainer(model=model, args=args, train_dataset=data, callbacks=[Hooks()]).train()
    assert method.hardened and method.step == steps
    small = method.finalize(model.eval(), groups)
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5
    assert 1 - count_flops(small, inputs) / count_flops(model, inputs) >= 0.35


@pytest.mark.parametrize("allocation", ["global", "layer", "group"])
def test_allocations_reach_the_target(allocation):
    """Each allocation meets the target; 'layer' cuts every layer alike, 'group' every group alike."""
    from hf_oto.methods.dsp import choose_blocks, profile

    model, inputs = build("vgg-bn")
    method = DSP(max_groups=4, example_inputs=inputs)
    method.prepare(model, None)
    total, costs = profile(model, inputs, list(method.layers))
    gen = torch.Generator().manual_seed(0)
    assignments = {p: torch.randint(0, 4, (m.weight.shape[0],), generator=gen) for p, m in method.layers.items()}
    energies = {p: filter_channel_energy(m.weight.detach()) for p, m in method.layers.items()}
    masks, _, reached = choose_blocks(energies, assignments, 4, costs, total, 0.5, allocation)
    assert 0.5 <= reached <= 0.53
    kept = {p: float(masks[p].float().mean()) for p in masks}  # fraction of each layer's MACs kept
    if allocation == "layer":
        assert max(kept.values()) - min(kept.values()) < 0.06, kept
    if allocation == "group":
        for p, mask in masks.items():
            per_group = {int(mask[assignments[p] == g].any(0).sum()) for g in assignments[p].unique()}
            assert max(per_group) - min(per_group) <= 1, (p, per_group)
    with pytest.raises(ValueError, match="allocation"):
        choose_blocks(energies, assignments, 4, costs, total, 0.5, "random")
    with pytest.raises(ValueError, match="allocation"):
        DSPConfig(allocation="random")


def test_shrink_window_takes_the_blocks_to_zero_gradually():
    model, inputs = build("vgg-bn")
    method = DSP(max_groups=3, flops_reduction=0.5, harden_at=8, shrink=4, total_steps=10, example_inputs=inputs)
    method.prepare(model, None)
    assert (method.select_step, method.harden_step) == (4, 8)
    optimizer = _train(model, inputs, method, steps=4)
    assert method.selected and not method.hardened and method.regularizer(model) is None
    path = "features.3.0"
    pruned = ~method.masks[path]

    def pruned_norm() -> float:
        return float(model.get_submodule(path).weight.detach().reshape(*pruned.shape, -1)[pruned].norm())

    norms = [pruned_norm()]
    for step in range(5, 9):
        _train(model, inputs, method, steps=step, start=step, optimizer=optimizer)
        norms.append(pruned_norm())
    assert norms[0] > 0 and all(b < a for a, b in zip(norms, norms[1:-1])) and norms[-1] == 0.0
    assert method.hardened and method.hardened_step == 8
    _train(model, inputs, method, steps=10, start=9, optimizer=optimizer)
    assert pruned_norm() == 0.0
    small = method.finalize(model, None)
    assert relative_difference(outputs(model, inputs), outputs(small, inputs)) <= 1e-5
