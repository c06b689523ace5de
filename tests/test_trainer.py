"""OTOTrainer: arguments, set-up checks, logging, model card, saving and pushing."""

import json
import os
import sys

import pytest
import torch
import yaml
from trainer_utils import classification_data, classifier, qa_data, qa_model, zero_groups
from transformers import HfArgumentParser, TrainerCallback

import hf_oto
from hf_oto import OTOTrainer, OTOTrainingArguments
from hf_oto.atomic import LEFTOVER_PREFIX
from hf_oto.compress.core import _run, max_relative_difference


def _args(tmp_path, **overrides) -> OTOTrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), oto_method="magnitude", target_group_sparsity=0.3,
                    max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=16, logging_steps=2,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, oto_measure_latency=False)
    settings.update(overrides)
    return OTOTrainingArguments(**settings)


# -- arguments --------------------------------------------------------------------------------------

def test_arguments_parse_from_command_line_json_and_yaml(tmp_path):
    parser = HfArgumentParser(OTOTrainingArguments)
    (cli,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--oto_method", "dhspg", "--target_group_sparsity", "0.4",
        "--oto_exclude", "layer\\.0", "classifier", "--oto_method_kwargs", '{"epsilon": 0.01}',
        "--oto_prune_hidden", "true", "--use_cpu", "true", "--report_to", "none"])
    assert cli.oto_method == "dhspg" and cli.target_group_sparsity == 0.4
    assert cli.oto_exclude == ["layer\\.0", "classifier"]
    assert cli.oto_method_kwargs == {"epsilon": 0.01}
    assert cli.group_config().prune_hidden and cli.group_config().exclude == ["layer\\.0", "classifier"]

    settings = {"output_dir": str(tmp_path), "oto_method": "hesso", "target_group_sparsity": 0.25,
                "oto_pruning_periods": 4, "use_cpu": True, "report_to": "none"}
    (tmp_path / "a.json").write_text(json.dumps(settings))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(settings))
    (from_json,) = parser.parse_json_file(str(tmp_path / "a.json"))
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "a.yaml"))
    assert from_json.oto_pruning_periods == from_yaml.oto_pruning_periods == 4
    assert from_json.target_group_sparsity == from_yaml.target_group_sparsity == 0.25


@pytest.mark.parametrize("field, value, message", [
    ("target_group_sparsity", 1.0, "target_group_sparsity"),
    ("target_group_sparsity", -0.1, "target_group_sparsity"),
    ("oto_method", "prune-everything", "unknown oto_method"),
    ("oto_variant", "lion", "oto_variant"),
    ("oto_pruning_periods", 0, "oto_pruning_periods"),
    ("oto_method_kwargs", "[1, 2]", "JSON object"),
])
def test_bad_arguments_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_pruning_window_resolution(tmp_path):
    args = OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, oto_pruning_start=0.1, oto_pruning_end=0.5)
    assert args.pruning_steps(100) == (10, 50)
    args = OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, oto_pruning_start=5, oto_pruning_end=20)
    assert args.pruning_steps(100) == (5, 20)
    with pytest.raises(ValueError, match="after the last training step"):
        args.pruning_steps(10)
    args = OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, oto_pruning_start=0.5, oto_pruning_end=0.5)
    with pytest.raises(ValueError, match="empty"):
        args.pruning_steps(100)


def test_trainer_needs_oto_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="OTOTrainingArguments"):
        OTOTrainer(model=classifier(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# -- bad input, before any training step -----------------------------------------------------------

def _untouched(path) -> bool:
    return not os.path.exists(path) or not os.listdir(path)


def test_missing_label_column_fails_before_training(tmp_path):
    data = classification_data().remove_columns(["labels"])
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path, remove_unused_columns=False), train_dataset=data)
    with pytest.raises(ValueError, match=r"no column\(s\) \['labels'\]"):
        trainer.train()
    assert trainer.state.global_step == 0 and _untouched(tmp_path / "out")


def test_missing_input_column_fails_before_training(tmp_path):
    data = qa_data().rename_column("input_ids", "tokens")
    trainer = OTOTrainer(model=qa_model(), args=_args(tmp_path, remove_unused_columns=False), train_dataset=data)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_target_that_removes_everything_is_refused(tmp_path):
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path, target_group_sparsity=0.999),
                         train_dataset=classification_data())
    with pytest.raises(ValueError, match="would remove all"):
        trainer.train()
    assert trainer.state.global_step == 0 and _untouched(tmp_path / "out")


def test_model_without_prunable_group_is_refused(tmp_path):
    from hf_oto import GroupConfig, find_groups

    model = classifier()
    trainer = OTOTrainer(model=model, args=_args(tmp_path, oto_prune_heads=False, oto_prune_neurons=False),
                         train_dataset=classification_data())
    with pytest.raises(ValueError, match="no prunable group"):
        trainer.train()
    groups = find_groups(classifier())
    other = OTOTrainer(model=qa_model(), args=_args(tmp_path), train_dataset=qa_data(), groups=groups)
    with pytest.raises(ValueError, match="another model"):
        other.train()
    assert GroupConfig().prune_heads


def test_unknown_method_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="oto_method_kwargs"):
        OTOTrainer(model=classifier(), args=_args(tmp_path, oto_method_kwargs={"nonsense": 1}),
                   train_dataset=classification_data())


def test_model_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model_init"):
        OTOTrainer(model_init=classifier, args=_args(tmp_path), train_dataset=classification_data())


# -- a full run with the magnitude baseline ----------------------------------------------------------

class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_train_logs_compresses_and_saves_with_a_model_card(tmp_path):
    recorder = _Recorder()
    data = classification_data()
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path, oto_measure_latency=True),
                         train_dataset=data, eval_dataset=data, callbacks=[recorder])
    trainer.train()
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged and all({"group_sparsity", "kept_params", "kept_flops"} <= set(log) for log in logged)
    report = trainer.oto_report
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert report.latency_before_s and report.latency_after_s
    assert sum(row["removed"] for row in report.layers) > 0
    assert set(report.metrics) == {"sparse", "compressed"}

    folder = trainer.save_compressed()
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "modeling_hf_oto.py", "README.md", "oto_report.json"} <= files
    card = (tmp_path / "out" / "compressed" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"hf_oto", "structured-pruning"} <= set(front["tags"])
    assert front["model-index"][0]["results"][0]["task"]["type"] == "text-classification"
    assert "| parameters |" in card and "| FLOPs" in card and "CPU latency" in card
    assert "trust_remote_code=True" in card and "hf_oto.from_pretrained" in card
    assert sys.argv[0].split("/")[-1] in card  # the command that reproduces it

    again = hf_oto.from_pretrained(folder)
    inputs = trainer._oto_inputs
    assert max_relative_difference(_run(trainer.compressed_model, inputs), _run(again, inputs)) == 0


def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    data = classification_data()
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path), train_dataset=data)
    trainer.train()
    folder = trainer.save_compressed()
    before = sorted(os.listdir(folder))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_oto.trainer.build_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_compressed()
    assert sorted(os.listdir(folder)) == before
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(LEFTOVER_PREFIX)]


class _FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        self.files = sorted(os.listdir(kwargs["folder_path"]))
        return "commit-info"


def test_push_to_hub_uploads_the_compressed_folder(tmp_path, monkeypatch):
    from transformers.utils import hub

    fake = _FakeHub()
    monkeypatch.setattr(hub, "_hf_api", fake)
    data = classification_data()
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path, hub_model_id="tiny-oto", hub_token="tok"),
                         train_dataset=data)
    trainer.train()
    assert trainer.push_to_hub(commit_message="compressed") == "commit-info"
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["create_repo", "upload_folder"]
    _, repo, upload = fake.calls[1]
    assert repo == "user/tiny-oto" and upload["commit_message"] == "compressed" and upload["token"] == "tok"
    assert upload["folder_path"].endswith(os.path.join("out", "compressed"))
    assert {"README.md", "config.json", "model.safetensors", "modeling_hf_oto.py"} <= set(fake.files)


def test_loss_scaling_probe(tmp_path):
    """Models that average their own loss must not be scaled by the number of processes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    trainer = OTOTrainer(model=classifier(), args=OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                         report_to=[]))
    batch = {k: torch.tensor(v[:4]) for k, v in classification_data()[:4].items()}
    trainer._probe_loss_scaling(batch)
    assert trainer.model_accepts_loss_kwargs is False

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    lm_trainer = OTOTrainer(model=lm, args=OTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    ids = torch.randint(0, 100, (2, 8))
    lm_trainer._probe_loss_scaling({"input_ids": ids, "labels": ids})
    assert lm_trainer.model_accepts_loss_kwargs is True


# -- group-sparsity methods through the trainer -------------------------------------------------------

def _oto_args(tmp_path, method="hesso", **overrides):
    settings = dict(oto_method=method, target_group_sparsity=0.4, max_steps=10, oto_pruning_start=2,
                    oto_pruning_end=7, oto_pruning_periods=2, learning_rate=1e-3)
    settings.update(overrides)
    return _args(tmp_path, **settings)


@pytest.mark.parametrize("method", ["hesso", "dhspg"])
def test_group_sparsity_reaches_the_target_and_compresses_exactly(tmp_path, method):
    data = qa_data()
    trainer = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path, method), train_dataset=data, eval_dataset=data)
    trainer.train()  # raises if the compressed model's metrics differ from the sparse model's
    groups = trainer.oto_groups
    zero = zero_groups(trainer)
    target = round(0.4 * groups.num_prunable)
    assert abs(int(zero.sum()) - target) <= 1
    report = trainer.oto_report
    assert report.params_after == report.params_before - groups.removed_param_count(groups.feasible_removal(zero))
    assert report.metrics["sparse"] == report.metrics["compressed"]
    logged = [log for log in trainer.state.log_history if "group_sparsity" in log]
    assert logged[-1]["group_sparsity"] == pytest.approx(int(zero.sum()) / groups.num_prunable)
    assert logged[-1]["kept_params"] == report.params_after


def test_mixed_precision_training_compresses_in_float32(tmp_path):
    # With bf16 (or fp16) accelerate replaces model.forward by an autocast wrapper. Compressing
    # through it compared two bf16 forward passes whose roundings differ (0.7% on MiniLM, 3% on a
    # GPU): the exactness check failed. The small model must not inherit the wrapper either.
    data = qa_data()
    model = qa_model()
    trainer = OTOTrainer(model=model, args=_oto_args(tmp_path, "hesso", bf16=True), train_dataset=data,
                         eval_dataset=data)
    trainer.train()
    assert "_original_forward" in model.__dict__, "the sparse model keeps its mixed-precision forward"
    small = trainer.compressed_model
    assert "forward" not in small.__dict__ and "_original_forward" not in small.__dict__
    assert report_metrics_equal(trainer.oto_report)
    inputs = trainer.oto_groups.example_inputs
    plain = type(model).forward.__get__(model)
    with torch.no_grad():
        model.eval()
        expected = plain(**inputs)
        small.eval()
        got = small(**inputs)
    assert max_relative_difference([expected.start_logits, expected.end_logits],
                                   [got.start_logits, got.end_logits]) < 1e-5
    assert got.start_logits.dtype == torch.float32


def test_a_tokenizer_collator_batch_is_traced_as_a_dict_of_two_examples(tmp_path):
    # With processing_class=tokenizer the Trainer collates BatchEncoding objects (a Mapping, not a
    # dict): they were traced whole, labels included, reported without their shapes, and left on
    # the GPU when the latency was measured on CPU (a device error after training on a GPU).
    from transformers import BatchEncoding, default_data_collator

    from hf_oto.measure import _to_cpu

    data = qa_data()
    trainer = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path, "hesso", oto_measure_latency=True),
                         train_dataset=data, eval_dataset=data,
                         data_collator=lambda features: BatchEncoding(default_data_collator(features)))
    trainer.train()
    inputs = trainer.oto_groups.example_inputs
    assert type(inputs) is dict and sorted(inputs) == ["attention_mask", "input_ids"]
    assert inputs["input_ids"].shape[0] == 2
    assert trainer.oto_report.flops_inputs == "input_ids [2, 16], attention_mask [2, 16]"
    assert trainer.oto_report.latency_after_s > 0
    moved = _to_cpu(BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)}))
    assert type(moved) is dict and moved["input_ids"].device.type == "cpu"


def test_unaligned_widths_are_reported_and_aligned_training_avoids_them(tmp_path, caplog):
    from hf_oto.measure import unaligned_widths

    data = qa_data()
    with caplog.at_level("WARNING", logger="hf_oto.trainer"):
        trainer = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "a", "hesso"), train_dataset=data)
        trainer.train()
    unaligned = unaligned_widths(trainer.model, trainer.compressed_model)
    assert unaligned and all(int(w.rsplit("=", 1)[1]) % 8 for w in unaligned)
    assert f"{len(unaligned)} pruned widths are not multiples of 8" in caplog.text
    assert "oto_width_multiple=8" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_oto.trainer"):
        trainer = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "b", "hesso", oto_width_multiple=8),
                             train_dataset=data)
        trainer.train()
    assert trainer.oto_report.num_removed_groups > 0
    assert unaligned_widths(trainer.model, trainer.compressed_model) == []
    assert "not multiples of" not in caplog.text


def report_metrics_equal(report) -> bool:
    return bool(report.metrics["sparse"]) and report.metrics["sparse"] == report.metrics["compressed"]


def _final_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path):
    data = qa_data()
    settings = dict(save_strategy="steps", save_steps=4, oto_check_compressed=False)
    full = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "a", **settings), train_dataset=data)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    assert (checkpoint / "oto_state.json").is_file()

    resumed = OTOTrainer(model=qa_model(seed=1), args=_oto_args(tmp_path / "b", **settings), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = _final_params(full), _final_params(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert torch.equal(zero_groups(full), zero_groups(resumed))


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    data = qa_data()
    first = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "a", save_strategy="steps", save_steps=4,
                                                         oto_check_compressed=False), train_dataset=data)
    first.train()
    checkpoint = str(tmp_path / "a" / "out" / "checkpoint-4")
    other = OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "b", target_group_sparsity=0.2),
                       train_dataset=data)
    with pytest.raises(ValueError, match="another OTO configuration.*target_group_sparsity"):
        other.train(resume_from_checkpoint=checkpoint)
    assert other.state.global_step == 0 and _untouched(tmp_path / "b" / "out")
    from transformers import Trainer, TrainingArguments

    Trainer(model=qa_model(), train_dataset=data,
            args=TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=2, save_steps=2, report_to=[],
                                   use_cpu=True)).train()
    with pytest.raises(ValueError, match="not written by OTOTrainer"):
        OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "c"), train_dataset=data).train(
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    with pytest.raises(ValueError, match="is incomplete.*missing the model weights.*optimizer.pt"):
        OTOTrainer(model=qa_model(), args=_oto_args(tmp_path / "c"), train_dataset=data).train(
            resume_from_checkpoint=str(empty))


@pytest.mark.parametrize("options", [{"structure": "prune", "prune_ratio": 0.3},
                                     {"structure": "low_rank", "rank_ratio": 0.5}])
def test_sfw_through_the_trainer(tmp_path, options):
    data = classification_data()
    trainer = OTOTrainer(model=classifier(), args=_oto_args(tmp_path, "sfw", oto_method_kwargs=options,
                                                            learning_rate=0.5),
                         train_dataset=data, eval_dataset=data)
    trainer.train()
    report = trainer.oto_report
    assert report.params_after < report.params_before and not report.exact
    if "prune_ratio" in options:  # the card's per-layer table counts the groups really removed
        removed = sum(row["removed"] for row in report.layers)
        assert removed == int(0.3 * trainer.oto_groups.num_prunable) > 0
    folder = trainer.save_compressed()
    again = hf_oto.from_pretrained(folder)
    inputs = trainer._oto_inputs
    assert max_relative_difference(_run(trainer.compressed_model, inputs), _run(again, inputs)) == 0


def test_opq_method_trains_exports_and_resumes(tmp_path):
    data = classification_data()
    settings = dict(oto_method_kwargs={"target_rate": 6.0}, save_strategy="steps", save_steps=4)
    full = OTOTrainer(model=classifier(), args=_oto_args(tmp_path / "a", "opq", **settings),
                      train_dataset=data, eval_dataset=data)
    full.train()  # the exported model's metrics must equal the fine-tuned quantized model's
    assert full.oto_groups is None  # OPQ works per layer, not on zero-invariant groups
    folder = full.save_compressed()
    again = hf_oto.from_pretrained(folder)
    inputs = full._oto_inputs
    assert max_relative_difference(_run(full.compressed_model, inputs), _run(again, inputs)) == 0

    resumed = OTOTrainer(model=classifier(), args=_oto_args(tmp_path / "b", "opq", **settings),
                         train_dataset=data, eval_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-4"))
    expected, got = _final_params(full), _final_params(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_post_quantization_after_structured_pruning(tmp_path):
    data = classification_data()
    trainer = OTOTrainer(model=classifier(), args=_oto_args(tmp_path, oto_post_quantize={"target_rate": 8.0}),
                         train_dataset=data, eval_dataset=data)
    trainer.train()
    report = trainer.oto_report
    assert report.quantization["compression_rate"] == pytest.approx(8.0, rel=0.01)
    assert {"sparse", "compressed", "quantized"} <= set(report.metrics)
    folder = trainer.save_compressed()
    assert "weights (OPQ)" in (tmp_path / "out" / "compressed" / "README.md").read_text()
    again = hf_oto.from_pretrained(folder)
    inputs = trainer._oto_inputs
    assert max_relative_difference(_run(trainer.compressed_model, inputs), _run(again, inputs)) == 0
    with pytest.raises(ValueError, match="unknown OPQ options"):
        _oto_args(tmp_path, oto_post_quantize={"bits": 3})


@pytest.mark.parametrize("flag,reason", [("is_deepspeed_enabled", "DeepSpeed ZeRO"), ("is_fsdp_enabled", "FSDP1")])
def test_sharded_training_is_refused(tmp_path, monkeypatch, flag, reason):
    """ZeRO and FSDP1 shard flat buffers, so group positions are not addressable: refuse at
    construction (FSDP2 is supported: tests/test_fsdp.py)."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        original(self)
        setattr(self, flag, True)  # what a DeepSpeed or FSDP launch would set

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    with pytest.raises(ValueError, match=reason):
        OTOTrainer(model=classifier(), args=_args(tmp_path), train_dataset=classification_data())


def test_example_inputs_replace_only_the_trace_inputs(tmp_path):
    data = classification_data()
    inputs = {"input_ids": torch.tensor(data[:3]["input_ids"]), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    trainer = OTOTrainer(model=classifier(), args=_args(tmp_path), train_dataset=data, example_inputs=inputs)
    trainer.train()
    assert trainer._oto_inputs["input_ids"].shape[0] == 2
    assert trainer.model_accepts_loss_kwargs is False  # the first batch was still probed

    torch.save(inputs, tmp_path / "inputs.pt")
    from_file = OTOTrainer(model=classifier(), args=_args(tmp_path / "f", oto_example_inputs=str(tmp_path / "inputs.pt")),
                           train_dataset=data)
    from_file.train()
    assert from_file.oto_groups.num_prunable == trainer.oto_groups.num_prunable
    missing = OTOTrainer(model=classifier(), args=_args(tmp_path / "m", oto_example_inputs=str(tmp_path / "none.pt")),
                         train_dataset=data)
    with pytest.raises(ValueError, match="oto_example_inputs"):
        missing.train()
