#!/usr/bin/env python
"""Causal language modelling trained once with Only-Train-Once: prune attention heads (whole
grouped-query KV groups) and FFN neurons of a decoder while it trains, then save the smaller model.

The usual Transformers causal-LM pipeline (tokenise, concatenate, cut into blocks, the
language-modelling collator) with OTOTrainer; perplexity on held-out text before pruning, for the
trained sparse model and for the compressed model (equal to the sparse one: the removed groups are
exactly zero), with the compression figures. The compressed model is written with its model card.

Offline default (a few minutes on 2 CPU cores): real English prose shipped with Python
(``pydoc_data.topics``, the language reference, split by topic), a byte-level BPE tokenizer trained
on it, and a small Llama-shaped decoder (4 query heads sharing 2 KV heads, gated FFN) built from a
config and pre-trained densely for ``--pretrain_steps`` steps as the stand-in for a pretrained
checkpoint:

    python examples/llm/run_clm.py

A pretrained model and a Hub dataset (needs network), on several GPUs with FSDP2
(``examples/llm/fsdp2.yaml``; see the README, "Causal LMs and FSDP2"):

    accelerate launch --config_file examples/llm/fsdp2.yaml examples/llm/run_clm.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --target_group_sparsity 0.3 --max_steps 2000 --output_dir out/clm-qwen
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, HfArgumentParser,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments, set_seed)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402
from hf_oto.distributed import leave_process_group  # noqa: E402
from hf_oto.fsdp import gather_dense_model, is_sharded  # noqa: E402

logger = logging.getLogger("run_clm")
SCRATCH = "scratch"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=SCRATCH, metadata={"help": "A Hub model id or local folder, or 'scratch': a small Llama-shaped decoder "
                                           "built from a config, with a BPE tokenizer trained on the data (offline)."})
    hidden_size: int = field(default=128, metadata={"help": "scratch: hidden width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "scratch: decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "scratch: query heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "scratch: KV heads (grouped-query attention)."})
    intermediate_size: int = field(default=384, metadata={"help": "scratch: FFN width."})
    vocab_size: int = field(default=1024, metadata={"help": "scratch: BPE vocabulary size."})
    pretrain_steps: int = field(default=300, metadata={
        "help": "scratch: dense training steps before pruning (the stand-in for a pretrained checkpoint)."})
    dense_baseline: bool = field(default=False, metadata={
        "help": "Also train a copy of the dense model for the same steps without pruning (a fair reference: "
                "the pruned model trained that long too)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset with a 'text' column (network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A plain-text training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A plain-text validation file."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation blocks."})


@dataclass
class ClmTrainingArguments(OTOTrainingArguments):
    """OTOTrainingArguments with defaults that finish on a 2-core CPU in a few minutes."""

    output_dir: str | None = field(default="out/clm", metadata={"help": "Where checkpoints and results go."})
    oto_method: str = field(default="hesso", metadata={"help": OTOTrainingArguments.__dataclass_fields__[
        "oto_method"].metadata["help"]})
    target_group_sparsity: float | None = field(default=None, metadata={
        "help": "Fraction of prunable groups to remove (0.3 unless --target_kept_flops/--target_kept_params is set)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_steps: int = field(default=300, metadata={"help": "Training steps with pruning."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device (training)."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Batch size per device (evaluation)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a fraction if < 1)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy."})

    def __post_init__(self) -> None:
        if self.target_group_sparsity is None and self.target_kept_flops is None and self.target_kept_params is None:
            self.target_group_sparsity = 0.3
        super().__post_init__()


def pydoc_text() -> tuple[list[str], list[str]]:
    """Python's language-reference prose (``pydoc_data.topics``): every tenth topic held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    paragraphs = [[p.strip() for p in topics[n].split("\n\n") if len(p.strip()) > 40] for n in names]
    train = [p for i, ps in enumerate(paragraphs) if i % 10 != 0 for p in ps]
    dev = [p for i, ps in enumerate(paragraphs) if i % 10 == 0 for p in ps]
    return train, dev


def load_text(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """The training and validation text (a 'text' column) and the data set's name for the card."""
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        for split in ("train", "validation"):
            if split not in raw:
                raise ValueError(f"dataset {data_args.dataset_name} has no '{split}' split (it has {list(raw)})")
        return raw["train"], raw["validation"], data_args.dataset_name
    if data_args.train_file or data_args.validation_file:
        if not (data_args.train_file and data_args.validation_file):
            raise ValueError("pass both --train_file and --validation_file")
        for path in (data_args.train_file, data_args.validation_file):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such file: {path}")
        raw = datasets.load_dataset("text", data_files={"train": data_args.train_file,
                                                        "validation": data_args.validation_file})
        return raw["train"], raw["validation"], os.path.basename(data_args.train_file)
    train, dev = pydoc_text()
    return (datasets.Dataset.from_dict({"text": train}), datasets.Dataset.from_dict({"text": dev}),
            "python-pydoc-topics")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (seconds; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def lm_blocks(raw: datasets.Dataset, tokenizer, block_size: int, limit: int | None) -> datasets.Dataset:
    """Tokenise, concatenate (an end-of-text token after each document) and cut into blocks."""
    if "text" not in raw.column_names:
        raise ValueError(f"the data set needs a 'text' column; it has {raw.column_names}")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        return {"input_ids": [ids[i:i + block_size] for i in range(0, usable, block_size)]}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenising")
    blocks = tokens.map(group, batched=True, desc=f"blocks of {block_size}")
    if limit:
        blocks = blocks.select(range(min(limit, len(blocks))))
    if len(blocks) == 0:
        raise ValueError(f"the text is shorter than one block of {block_size} tokens")
    return blocks


def build_model(model_args: ModelArguments, tokenizer):
    """The model to prune: pretrained, or for 'scratch' a Llama-shaped decoder from a config (random weights)."""
    if model_args.model_name_or_path != SCRATCH:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=model_args.hidden_size,
                         num_hidden_layers=model_args.num_hidden_layers,
                         num_attention_heads=model_args.num_attention_heads,
                         num_key_value_heads=model_args.num_key_value_heads,
                         intermediate_size=model_args.intermediate_size, max_position_embeddings=1024,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def perplexity(metrics: dict[str, float], prefix: str = "eval") -> float:
    return math.exp(min(metrics[f"{prefix}_loss"], 50.0))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ClmTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, ClmTrainingArguments),
                              description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    train_raw, dev_raw, data_name = load_text(data_args)
    if model_args.model_name_or_path == SCRATCH:
        tokenizer = train_tokenizer(train_raw["text"], model_args.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first(desc="tokenising"):
        train = lm_blocks(train_raw, tokenizer, data_args.block_size, data_args.max_train_samples)
        dev = lm_blocks(dev_raw, tokenizer, data_args.block_size, data_args.max_eval_samples)
    model = build_model(model_args, tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    if model_args.model_name_or_path == SCRATCH and model_args.pretrain_steps > 0:
        # Dense pre-training, in place of downloading a pretrained checkpoint.
        dense_args = TrainingArguments(
            output_dir=os.path.join(training_args.output_dir, "dense"), max_steps=model_args.pretrain_steps,
            learning_rate=training_args.learning_rate, per_device_train_batch_size=training_args.per_device_train_batch_size,
            warmup_steps=0.05, logging_steps=training_args.logging_steps, save_strategy="no", report_to="none",
            seed=training_args.seed, use_cpu=training_args.use_cpu)
        Trainer(model=model, args=dense_args, train_dataset=train, data_collator=collator).train()
        if is_sharded(model):  # FSDP sharded it: OTOTrainer starts from the dense model
            model = gather_dense_model(model, everywhere=True)

    baseline = None
    if model_args.dense_baseline:
        dense_args = TrainingArguments(
            output_dir=os.path.join(training_args.output_dir, "dense-baseline"), max_steps=training_args.max_steps,
            learning_rate=training_args.learning_rate, per_device_train_batch_size=training_args.per_device_train_batch_size,
            per_device_eval_batch_size=training_args.per_device_eval_batch_size, warmup_steps=training_args.warmup_steps,
            lr_scheduler_type=training_args.lr_scheduler_type, weight_decay=training_args.weight_decay,
            logging_steps=training_args.logging_steps, save_strategy="no", report_to="none", seed=training_args.seed,
            use_cpu=training_args.use_cpu)
        reference = Trainer(model=copy.deepcopy(model), args=dense_args, train_dataset=train, eval_dataset=dev,
                            data_collator=collator)
        reference.train()
        baseline = perplexity(reference.evaluate())
        del reference

    # The dense perplexity comes from the Trainer's evaluation at step 0 (eval_on_start): under FSDP2
    # an evaluate() before train() would shard the model without its optimizer, which accelerate refuses.
    training_args.eval_on_start = True
    trainer = OTOTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                         data_collator=collator, processing_class=tokenizer)
    trainer.train()
    before = next(e for e in trainer.state.log_history if "eval_loss" in e)
    report = trainer.oto_report
    report.datasets = [data_name]
    if model_args.model_name_or_path != SCRATCH:
        report.base_model = model_args.model_name_or_path
    stages = report.metrics  # "sparse" and "compressed" (eval_loss), checked equal by OTOTrainer
    ppl = {"dense": perplexity(before)}
    if "sparse" in stages:
        ppl.update(sparse=perplexity(stages["sparse"]), compressed=perplexity(stages["compressed"]))
    elif training_args.oto_check_compressed:  # FSDP2: the sparse model, evaluated on every rank
        ppl["sparse"] = perplexity(trainer.evaluate())
    report.metrics = {"dense start": {"perplexity": ppl["dense"]},
                      **{k: {**stages.get(k, {}), "perplexity": ppl[k]} for k in ("sparse", "compressed") if k in ppl}}
    if baseline is not None:
        ppl["dense_baseline"] = baseline
        report.metrics["dense, trained as long without pruning"] = {"perplexity": baseline}
    folder = trainer.save_compressed()
    results = {"perplexity": ppl, "params": [report.params_before, report.params_after],
               "flops": [report.flops_before, report.flops_after], "folder": folder,
               "num_removed_groups": report.num_removed_groups, "num_prunable_groups": report.num_prunable_groups}
    if trainer.is_world_process_zero():
        print(f"parameters   {report.params_before / 1e6:8.3f}M -> {report.params_after / 1e6:8.3f}M")
        print(f"FLOPs        {report.flops_before / 1e6:8.1f}M -> {report.flops_after / 1e6:8.1f}M")
        print(f"perplexity   dense {ppl['dense']:.2f}" + "".join(f", {name} {ppl[key]:.2f}" for key, name in (
            ("sparse", "trained sparse"), ("compressed", "compressed")) if key in ppl))
        if baseline is not None:
            print(f"perplexity   dense trained as long without pruning {baseline:.2f}")
        print(f"compressed model and card: {folder}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, without a traceback
        sys.exit(f"{os.path.basename(__file__)}: error: {err}")
    leave_process_group()
