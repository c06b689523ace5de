"""Complete checkpoints only: resume skips or refuses damaged ones, rotation never trades a complete
checkpoint for an incomplete one, folders appear whole under their final name."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future

import pytest
import torch
from trainer_utils import qa_data, qa_model

from hf_oto import OTOTrainer, OTOTrainingArguments
from hf_oto.atomic import LEFTOVER_PREFIX, clean_leftovers, publish_dir, remove_dir, staging_path
from hf_oto.checkpoints import OTO_CHECKPOINT_FILE, checkpoint_folders, inspect_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(out, **overrides) -> OTOTrainingArguments:
    settings = dict(output_dir=str(out), oto_method="hesso", target_group_sparsity=0.4, max_steps=10,
                    oto_pruning_start=2, oto_pruning_end=7, oto_pruning_periods=2, learning_rate=1e-3,
                    per_device_train_batch_size=8, logging_steps=5, report_to=[], save_strategy="steps",
                    save_steps=4, use_cpu=True, seed=0, disable_tqdm=True, oto_measure_latency=False,
                    oto_check_compressed=False)
    settings.update(overrides)
    return OTOTrainingArguments(**settings)


def _params(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run with checkpoints 4, 8 and 10, and its final weights."""
    out = tmp_path_factory.mktemp("full") / "out"
    trainer = OTOTrainer(model=qa_model(), args=_args(out), train_dataset=qa_data())
    trainer.train()
    return out, _params(trainer)


def _copy_run(full_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(full_run[0], out)
    return out


def test_checkpoints_hold_everything_a_resume_needs(full_run):
    out, _ = full_run
    assert [os.path.basename(f) for f in checkpoint_folders(out)] == ["checkpoint-10", "checkpoint-8", "checkpoint-4"]
    for folder in checkpoint_folders(out):
        assert inspect_checkpoint(folder).complete
        files = set(os.listdir(folder))
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                OTO_CHECKPOINT_FILE} <= files
    assert not [e for e in os.listdir(out) if e.startswith(LEFTOVER_PREFIX)]


def test_resume_true_skips_an_incomplete_checkpoint_with_a_warning(full_run, tmp_path):
    out = _copy_run(full_run, tmp_path)
    os.remove(out / "checkpoint-10" / "optimizer.pt")
    assert inspect_checkpoint(out / "checkpoint-10").missing == ("optimizer.pt",)
    resumed = OTOTrainer(model=qa_model(seed=1), args=_args(out), train_dataset=qa_data())
    with pytest.warns(UserWarning, match=r"checkpoint-10 lacks optimizer.pt.*resuming from checkpoint-8"):
        resumed.train(resume_from_checkpoint=True)
    expected, got = full_run[1], _params(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    # The damaged checkpoint was replaced by a complete one at the same step.
    assert inspect_checkpoint(out / "checkpoint-10").complete
    assert not [e for e in os.listdir(out) if e.startswith(LEFTOVER_PREFIX)]


def test_explicit_incomplete_checkpoint_is_refused_naming_what_is_missing(full_run, tmp_path):
    out = _copy_run(full_run, tmp_path)
    weights = out / "checkpoint-8" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(100)
    os.remove(out / "checkpoint-4" / "rng_state.pth")
    for folder, message in [("checkpoint-8", r"missing model.safetensors \(truncated: 100 of \d+ bytes\)"),
                            ("checkpoint-4", "missing rng_state.pth")]:
        trainer = OTOTrainer(model=qa_model(), args=_args(tmp_path / "new"), train_dataset=qa_data())
        with pytest.raises(ValueError, match=f"{folder} is incomplete.*{message}"):
            trainer.train(resume_from_checkpoint=str(out / folder))
        assert trainer.state.global_step == 0
    # An OTOTrainer checkpoint without its state (as older versions could leave) is incomplete, not foreign.
    os.remove(out / "checkpoint-10" / OTO_CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="checkpoint-10 is incomplete.*missing oto_state.json"):
        OTOTrainer(model=qa_model(), args=_args(tmp_path / "new"), train_dataset=qa_data()).train(
            resume_from_checkpoint=str(out / "checkpoint-10"))
    for folder in ("checkpoint-10", "checkpoint-8", "checkpoint-4"):
        os.remove(out / folder / "trainer_state.json")
    with pytest.raises(ValueError, match="no complete checkpoint.*checkpoint-10 lacks trainer_state.json, oto_state"):
        OTOTrainer(model=qa_model(), args=_args(out), train_dataset=qa_data()).train(resume_from_checkpoint=True)


def test_rotation_keeps_the_newest_complete_checkpoint_and_leftovers_are_cleaned(tmp_path):
    out = tmp_path / "out"
    # What crashes left: a checkpoint folder with a higher step but no state (written by something
    # else, or by an older version), a half-written staging folder, a half-deleted one.
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / "config.json").write_text("{}")
    stale = out / f"{LEFTOVER_PREFIX}staging-checkpoint-4" / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "stale.bin").write_bytes(b"x")
    (out / f"{LEFTOVER_PREFIX}trash-checkpoint-2").mkdir()
    trainer = OTOTrainer(model=qa_model(), args=_args(out, save_total_limit=1, save_steps=2),
                         train_dataset=qa_data())
    trainer.train()
    # checkpoint-99 is neither counted nor deleted (Trainer's rotation counts it, and keeps it as the
    # newest in place of checkpoint-10 when it orders by step).
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-99"]
    assert inspect_checkpoint(out / "checkpoint-10").complete
    assert (out / "checkpoint-99" / "config.json").exists()
    with pytest.warns(UserWarning, match="checkpoint-99 lacks"):
        assert OTOTrainer(model=qa_model(), args=_args(out), train_dataset=qa_data())._oto_last_checkpoint() \
            == str(out / "checkpoint-10")


def test_best_checkpoint_is_recorded_under_its_final_name(tmp_path):
    out = tmp_path / "out"
    data = qa_data()
    trainer = OTOTrainer(model=qa_model(), train_dataset=data, eval_dataset=data,
                         args=_args(out, save_steps=2, eval_strategy="steps", eval_steps=2, save_total_limit=1,
                                    load_best_model_at_end=True, metric_for_best_model="loss"))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(out) and os.path.basename(best).startswith("checkpoint-")
    # Trainer deletes every checkpoint but the best one at the end when save_total_limit=1.
    assert os.listdir(out) == [os.path.basename(best)] and inspect_checkpoint(best).complete
    with open(os.path.join(best, "trainer_state.json")) as f:
        assert json.load(f)["best_model_checkpoint"] == best


class _FakeHub:
    """Records what each upload would send, as Trainer's background uploads read it."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        self.uploads.append((folder_path, path_in_repo, sorted(os.listdir(folder_path))))
        done = Future()
        done.set_result("commit")
        return done


def test_checkpoint_pushes_send_the_complete_checkpoint(tmp_path, monkeypatch):
    from transformers.utils import hub

    fake = _FakeHub()
    monkeypatch.setattr(hub, "_hf_api", fake)
    out = tmp_path / "out"
    trainer = OTOTrainer(model=qa_model(), args=_args(out, push_to_hub=True, hub_model_id="tiny", hub_token="t",
                                                     hub_strategy="checkpoint"),
                         train_dataset=qa_data())
    trainer.train()
    checkpoints = [(folder, files) for folder, where, files in fake.uploads if where == "last-checkpoint"]
    assert checkpoints
    for folder, files in checkpoints:
        assert os.path.basename(folder).startswith("checkpoint-") and LEFTOVER_PREFIX not in folder
        assert OTO_CHECKPOINT_FILE in files


# -- the folder operations ----------------------------------------------------------------------------

def _folder(path, text):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "a.txt"), "w") as f:
        f.write(text)


def _read(path):
    with open(os.path.join(path, "a.txt")) as f:
        return f.read()


def test_publish_replaces_a_folder_and_a_crash_between_renames_is_undone(tmp_path, monkeypatch):
    target = tmp_path / "result"
    _folder(target, "old")
    staging = staging_path(target)
    _folder(staging, "new")
    publish_dir(staging, target)
    assert _read(target) == "new" and os.listdir(tmp_path) == ["result"]

    staging = staging_path(target)
    _folder(staging, "newer")
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops between moving the old folder aside and the new in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(staging, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    assert sorted(clean_leftovers(tmp_path)) == [os.path.basename(staging)]
    assert _read(target) == "new" and os.listdir(tmp_path) == ["result"]


def test_remove_dir_and_leftovers_of_other_targets(tmp_path):
    _folder(tmp_path / "checkpoint-2", "x")
    remove_dir(tmp_path / "checkpoint-2")
    assert os.listdir(tmp_path) == []
    _folder(staging_path(tmp_path / "compressed"), "half")
    _folder(staging_path(tmp_path / "other"), "half")
    assert len(clean_leftovers(tmp_path, "compressed")) == 1
    assert len(os.listdir(tmp_path)) == 1  # another target's leftovers are not this save's to remove
    assert oct(os.stat(staging_path(tmp_path / "x")).st_mode & 0o777) != "0o700"  # results are not private
