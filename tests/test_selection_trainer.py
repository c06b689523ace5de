"""The trainer's selection options: saliency, FLOPs/parameter targets, aligned counts; what it logs and
what the model card says."""

import pytest
from trainer_utils import qa_data, qa_model
from transformers import HfArgumentParser, TrainerCallback

from hf_oto import OTOTrainer, OTOTrainingArguments
from hf_oto.measure import count_flops


def _args(tmp_path, **overrides) -> OTOTrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), oto_method="hesso", max_steps=10, oto_pruning_start=2,
                    oto_pruning_end=8, oto_pruning_periods=3, learning_rate=1e-3, per_device_train_batch_size=8,
                    per_device_eval_batch_size=16, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                    seed=0, oto_measure_latency=False)
    settings.update(overrides)
    return OTOTrainingArguments(**settings)


def test_selection_options_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(OTOTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--oto_method", "dhspg", "--target_kept_flops", "0.5",
        "--oto_saliency", "taylor", "--oto_group_divisible", "8", "--use_cpu", "true", "--report_to", "none"])
    assert (args.target_kept_flops, args.oto_saliency, args.oto_group_divisible) == (0.5, "taylor", 8)
    assert args.target_group_sparsity is None  # the FLOPs target replaces it
    assert args.selection().unit == "flops"
    assert args.oto_summary()["target_kept_flops"] == 0.5
    plain = OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert plain.target_group_sparsity == 0.5 and plain.oto_saliency == "taylor_abs"


@pytest.mark.parametrize("overrides, message", [
    (dict(target_kept_flops=1.5), r"target_kept_flops must be in \(0.0, 1.0\]"),
    (dict(target_kept_params=0.0), r"target_kept_params must be in \(0.0, 1.0\]"),
    (dict(target_kept_flops=0.5, target_kept_params=0.5), "set one target"),
    (dict(target_kept_flops=0.5, target_group_sparsity=0.4), "set one target: target_group_sparsity=0.4"),
    (dict(oto_saliency="snip"), "unknown saliency 'snip'"),
    (dict(oto_group_divisible=0), "group_divisible must be an integer >= 1"),
    (dict(oto_method="sfw", target_kept_flops=0.5), "target_kept_flops applies to oto_method hesso or dhspg"),
    (dict(oto_method="magnitude", oto_group_divisible=8), "oto_group_divisible applies to oto_method hesso or dhspg"),
])
def test_bad_selection_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **overrides)


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("method", ["hesso", "dhspg"])
def test_a_flops_target_is_met_logged_and_on_the_model_card(tmp_path, method):
    recorder = _Recorder()
    data = qa_data()
    trainer = OTOTrainer(model=qa_model(), args=_args(tmp_path, oto_method=method, target_kept_flops=0.5,
                                                      oto_group_divisible=2),
                         train_dataset=data, eval_dataset=data, callbacks=[recorder])
    trainer.train()  # raises if the compressed model's metrics differ from the sparse model's
    report = trainer.oto_report
    kept = report.flops_after / report.flops_before
    assert kept <= 0.5 + 1e-9 and kept > 0.45
    assert report.flops_after == count_flops(trainer.compressed_model, trainer._oto_inputs)
    logged = [log for log in recorder.logs if "loss" in log]
    last = logged[-1]
    assert {"group_sparsity", "kept_params", "kept_flops", "kept_params_ratio", "kept_flops_ratio",
            "target_kept_flops", "planned_kept_flops"} <= set(last)
    assert last["kept_flops"] == report.flops_after and last["target_kept_flops"] == 0.5
    assert last["planned_kept_flops"] == pytest.approx(kept)
    assert report.num_removed_groups == int(last["num_zero_groups"]) > 0
    folder = trainer.save_compressed()
    card = open(f"{folder}/README.md").read()
    assert "| prunable groups" in card and "Target: kept FLOPs 0.5" in card
    assert f"{kept:.1%} of the FLOPs" in card
