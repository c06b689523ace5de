"""The optimizer factory plugged into a plain transformers.Trainer, including checkpoint resume."""

import torch
from transformers import Trainer, TrainingArguments

from hf_oto import find_groups
from hf_oto.optim import HESSO, OTOOptimizerFactory
from hf_oto.testing.zoo import build


def _dataset(n: int = 16):
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 120, (13,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "labels": int(torch.randint(0, 3, (1,), generator=g))})
    return rows


def _trainer(tmp_path, model, groups, **args):
    kwargs = {"groups": groups, "method": "hesso", "lr": 1e-3, "target_group_sparsity": 0.3,
              "start_pruning_step": 2, "pruning_steps": 4, "pruning_periods": 2}
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, use_cpu=True,
                              report_to="none", logging_strategy="no", disable_tqdm=True, seed=0,
                              dataloader_num_workers=0, **args)
    return Trainer(model=model, args=targs, train_dataset=_dataset(),
                   optimizer_cls_and_kwargs=(OTOOptimizerFactory, kwargs))


def test_trainer_with_factory_prunes_to_target_and_resumes_from_checkpoint(tmp_path):
    model, inputs = build("bert-seq-cls")
    groups = find_groups(model, inputs)
    trainer = _trainer(tmp_path / "a", model, groups, save_strategy="steps", save_steps=4)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(opt, HESSO)
    assert opt.step_count == 8 and opt.pruning_finished
    assert opt.metrics()["num_zero_groups"] == int(0.3 * groups.num_prunable)
    assert trainer.lr_scheduler.get_last_lr()[0] < 1e-3  # the linear schedule moved the lr, not the pruning
    final = [p.detach().clone() for p in model.parameters()]

    again, _ = build("bert-seq-cls")
    resumed = _trainer(tmp_path / "a", again, groups, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    opt2 = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert opt2.step_count == 8
    for a, b in zip(final, again.parameters()):
        assert torch.equal(a, b)
