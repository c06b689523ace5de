"""hf_oto's optimizers on FSDP2 (fully_shard, DTensor rows) on CPU/gloo: two ranks end like one process
with the same global batch, the optimizer state is sharded, and a sharded checkpoint resumes exactly."""

import json
import os
import sys

import pytest
import torch

from helpers import needs_accelerate_fsdp2, needs_accelerate_fsdp2_resume
from test_distributed import _launcher, _run


HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "fsdp_optim.py")

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")


def _results(folder):
    ranks = sorted(p for p in os.listdir(folder) if p.startswith("result-rank"))
    return [json.load(open(os.path.join(folder, p))) for p in ranks], torch.load(os.path.join(folder, "params.pt"))


def _max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Llama with grouped-query attention (heads, FFN neurons: rows of q/k/v/gate/up on each rank's shard,
# columns of o/down summed across ranks), float64 so that only the optimizer's arithmetic differs.
# Mixtral's experts are 3-D tensors sharded on the expert dim (per-expert position grids); its
# grouped_mm runs in float32 only, where splitting the batch alone moves weights by ~1e-6. The MLP
# has uneven shards and a rank without rows.
@pytest.mark.parametrize("method,model,dtype,tol", [("hesso", "llama", "float64", 1e-6), ("dhspg", "llama", "float64", 1e-6),
                                                    ("hesso", "mixtral", "float32", 2e-5),
                                                    ("dhspg", "mlp", "float64", 1e-6)])
def test_fsdp_two_ranks_match_one_process(tmp_path, method, model, dtype, tol, monkeypatch):
    monkeypatch.setenv("FSDP_TEST_DTYPE", dtype)
    _run([*_launcher("torchrun"), SCRIPT, str(tmp_path / "fsdp"), method, model, "8"], tmp_path)
    _run([sys.executable, SCRIPT, str(tmp_path / "single"), method, model, "8"], tmp_path)
    (rank0, rank1), sharded = _results(tmp_path / "fsdp")
    (single,), dense = _results(tmp_path / "single")
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert single["prunable_zero"] == single["target"] > 0  # the run did prune
    assert rank0["zero_groups"] == rank1["zero_groups"] == single["zero_groups"]
    assert _max_difference(sharded, dense) <= tol
    # The state is sharded like the parameters: each rank holds half of it, as DTensors.
    assert rank0["state_types"] == rank1["state_types"] == ["DTensor"]
    assert rank0["state_bytes"] + rank1["state_bytes"] == single["state_bytes"]
    if model != "mlp":  # (the MLP's widths are odd on purpose: its shards are uneven)
        assert max(rank0["state_bytes"], rank1["state_bytes"]) <= 0.55 * single["state_bytes"]


def test_fsdp_sharded_checkpoint_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("FSDP_TEST_DTYPE", "float64")
    # The full run saves a torch.distributed.checkpoint after 4 of 8 steps (inside the pruning
    # window, at the start of its second period); the resumed run loads it and takes steps 4..7.
    _run([*_launcher("torchrun"), SCRIPT, str(tmp_path / "full"), "dhspg", "llama", "8"], tmp_path)
    _run([*_launcher("torchrun"), SCRIPT, str(tmp_path / "resumed"), "dhspg", "llama", "8",
          str(tmp_path / "full" / "ckpt")], tmp_path)
    (full0, _), full = _results(tmp_path / "full")
    (resumed0, _), resumed = _results(tmp_path / "resumed")
    assert resumed0["zero_groups"] == full0["zero_groups"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _accelerate_fsdp2() -> list[str]:
    """accelerate launch with FSDP2 from its own options (what a config file sets), 2 processes."""
    launch = _launcher("accelerate")  # its DDP form: swap --multi_gpu for the FSDP options
    return [launch[0], "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
            *launch[3:]]


@needs_accelerate_fsdp2
@pytest.mark.parametrize("launcher,method", [("torchrun", "hesso"), ("accelerate", "dhspg")])
def test_trainer_fsdp2_matches_one_process_and_rank0_saves(tmp_path, launcher, method):
    script = os.path.join(HERE, "fsdp_trainer.py")
    launch = _launcher("torchrun") if launcher == "torchrun" else _accelerate_fsdp2()
    _run([*launch, script, str(tmp_path / "fsdp"), method, "4"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "single"), method, "8"], tmp_path)
    rank0, rank1, single = (json.load(open(tmp_path / p)) for p in
                            ("fsdp/result-rank0.json", "fsdp/result-rank1.json", "single/result-rank0.json"))
    assert rank0["fsdp"] and rank0["param_types"] == ["DTensor"]  # the optimizer really ran on shards
    assert single["world_size"] == 1 and not single["fsdp"]
    assert rank0["zero_groups"] == rank1["zero_groups"] == single["zero_groups"] != []
    for name, value in single["params"].items():
        assert abs(rank0["params"][name] - value) <= 1e-4 * max(1.0, abs(value)), name
    # Rank 0 gathered, compressed and saved; rank 1 holds the report only.
    assert rank0["compressed_params"] == single["compressed_params"] == rank1["report_params_after"]
    assert rank1["compressed_params"] is None
    from hf_oto import from_pretrained

    reloaded = from_pretrained(rank0["folder"])
    assert sum(p.numel() for p in reloaded.parameters()) == single["compressed_params"]
    assert os.path.exists(os.path.join(rank0["folder"], "README.md"))


def test_trainer_refuses_flat_sharding():
    from types import SimpleNamespace

    from hf_oto.fsdp import check_sharding
    from hf_oto.methods import get_method

    hesso = get_method("hesso")()
    plain = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
    assert check_sharding(plain, False, False, hesso) is False
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*cuts through"):
        check_sharding(plain, True, False, hesso)
    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="FSDP1"):
        check_sharding(fsdp1, False, True, hesso)
    fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    assert check_sharding(fsdp2, False, True, hesso) is True
    with pytest.raises(ValueError, match="group-sparsity methods"):
        check_sharding(fsdp2, False, True, get_method("magnitude")())


@needs_accelerate_fsdp2_resume
def test_trainer_fsdp2_checkpoint_resumes_bit_for_bit(tmp_path):
    # A sharded (DCP) Trainer checkpoint after 4 of 8 steps, in the pruning window (steps 2..5):
    # the resumed run ends with the very same weights and zero groups.
    script = os.path.join(HERE, "fsdp_trainer.py")
    _run([*_launcher("torchrun"), script, str(tmp_path / "full"), "hesso", "4", "save"], tmp_path)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "oto_optimizer.pt").exists() and (checkpoint / "optimizer_0").is_dir()
    _run([*_launcher("torchrun"), script, str(tmp_path / "resumed"), "hesso", "4", str(checkpoint)], tmp_path)
    full, resumed = (json.load(open(tmp_path / p / "result-rank0.json")) for p in ("full", "resumed"))
    assert resumed["zero_groups"] == full["zero_groups"] != []
    assert resumed["digest"] == full["digest"]
