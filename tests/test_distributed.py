"""OTOTrainer under DDP on CPU (gloo): two processes end like one process with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
METHODS = ["hesso", "dhspg", "magnitude"]


def _free_port() -> int:
    # torchrun with --master_port 0 waits forever for its rendezvous: give it a real port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1"}
    # A new session, so that a hung run can be killed with its worker processes.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]


def _launcher(name: str) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(exe):
        pytest.skip(f"{name} not installed")
    if name == "torchrun":
        return [exe, "--nproc_per_node", "2", "--master_port", str(_free_port())]
    # `accelerate launch --cpu --num_processes 2` starts one process; --multi_gpu runs DDP on gloo
    # when no GPU is present.
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


@pytest.mark.parametrize("launcher,method", [("torchrun", m) for m in METHODS] + [("accelerate", "hesso")])
def test_two_processes_match_one(tmp_path, launcher, method):
    script = os.path.join(HERE, "ddp_train.py")
    _run([*_launcher(launcher), script, str(tmp_path / "ddp"), method, "4"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "single"), method, "8"], tmp_path)
    rank0, rank1, single = (json.load(open(tmp_path / p)) for p in
                            ("ddp/result-rank0.json", "ddp/result-rank1.json", "single/result-rank0.json"))
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["zero_groups"] == rank1["zero_groups"] == single["zero_groups"]
    assert rank0["params"] == rank1["params"]  # replicas stay identical
    for name, value in single["params"].items():
        assert abs(rank0["params"][name] - value) <= 1e-4 * max(1.0, abs(value)), name
    assert rank0["compressed_params"] == single["compressed_params"]
    # The classifier averages its own loss: Trainer must not scale it by the number of processes.
    assert rank0["model_accepts_loss_kwargs"] is False
