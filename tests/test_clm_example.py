"""examples/llm/run_clm.py on tiny settings: the offline default pipeline prunes a GQA decoder, the
compressed model's perplexity equals the sparse model's, and the saved folder reloads."""

import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "examples", "llm"))

import run_clm  # noqa: E402
from helpers import needs_accelerate_fsdp2  # noqa: E402


TINY = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--intermediate_size", "64", "--vocab_size", "300", "--block_size", "32", "--pretrain_steps", "10",
        "--max_steps", "12", "--max_train_samples", "256", "--max_eval_samples", "32", "--logging_steps", "6",
        "--per_device_train_batch_size", "8", "--target_group_sparsity", "0.4", "--oto_pruning_periods", "2",
        "--use_cpu", "true"]


def test_clm_example_prunes_and_keeps_perplexity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = run_clm.main([*TINY, "--output_dir", str(tmp_path / "out")])
    ppl = results["perplexity"]
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["dense"] < 300  # the dense warm start learned something (300 tokens: uniform guessing)
    assert ppl["compressed"] == pytest.approx(ppl["sparse"], rel=1e-4)  # exact compression
    before, after = results["params"]
    assert after < before and results["num_removed_groups"] > 0
    from hf_oto import from_pretrained

    model = from_pretrained(results["folder"])
    assert sum(p.numel() for p in model.parameters()) == after
    ids = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert os.path.exists(os.path.join(results["folder"], "README.md"))
    assert os.path.exists(os.path.join(results["folder"], "tokenizer.json"))


def test_clm_example_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_clm.main([*TINY, "--output_dir", str(tmp_path / "out"), "--train_file", str(tmp_path / "nope.txt"),
                      "--validation_file", str(tmp_path / "nope.txt")])


@needs_accelerate_fsdp2
def test_clm_example_under_accelerate_fsdp2(tmp_path):
    """The README's multi-GPU command, on CPU with 2 processes: accelerate shards the decoder
    (FSDP2), rank 0 writes the compressed model, both ranks report the same numbers."""
    import json

    from test_distributed import _launcher, _run

    launch = _launcher("accelerate")
    command = [launch[0], "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
               "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
               "--fsdp_state_dict_type", "SHARDED_STATE_DICT", *launch[3:], os.path.join(HERE, "fsdp_clm.py"),
               *TINY, "--per_device_train_batch_size", "4",  # (the last value wins: the same global batch)
               "--output_dir", str(tmp_path / "out")]
    _run(command, tmp_path)
    rank0, rank1 = (json.load(open(tmp_path / "out" / f"result-rank{r}.json")) for r in (0, 1))
    assert rank0 == rank1
    before, after = rank0["params"]
    assert after < before and rank0["num_removed_groups"] > 0
    assert all(math.isfinite(v) for v in rank0["perplexity"].values())
    from hf_oto import from_pretrained

    model = from_pretrained(rank0["folder"])
    assert sum(p.numel() for p in model.parameters()) == after
