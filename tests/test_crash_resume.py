"""A run killed with SIGKILL at any point resumes, with ``resume_from_checkpoint=True``, to the
same weights and the same compressed folder, bit for bit, as a run never interrupted.

Each scenario trains tests/crash_train.py (tiny BERT-QA, 120 steps, a checkpoint every 10 steps,
save_total_limit=3), kills it at a chosen event, checks what the kill left on disk (every
``checkpoint-N`` complete, the compressed folder absent or whole), and restarts it to the end.
One process runs forked from a server that has the libraries loaded (a run costs its training,
not its imports); two processes run under torchrun, one of them killed.
"""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import crash_train
import pytest
from test_distributed import _free_port

from hf_oto.atomic import LEFTOVER_PREFIX
from hf_oto.checkpoints import checkpoint_folders, inspect_checkpoint

# Kill points, spread over the run: <event>:<n> dies at the n-th event (see crash_train.py).
# Steps: mid-step (before the optimizer) and after it, in warm-up, pruning and after.
STEP_KILLS = ["step:3", "step:27", "step:44", "step:61", "step:88", "step:119",
              "stepped:15", "stepped:72", "stepped:120", "train_end:1"]
# Checkpoint writes: 4 torch.save files per checkpoint (training_args, optimizer, scheduler, RNG),
# the weights, the OTO state, Trainer's state, the config; the rename that publishes a checkpoint
# (and the rotation's renames); rotation's deletes; flushing to disk.
CHECKPOINT_KILLS = ["torch.save:2", "torch.save:7", "torch.save:20", "torch.save:25", "torch.save:42",
                    "torch.save:48", "safetensors:1", "safetensors:6", "safetensors:12",
                    "write:oto_state.json:1", "write:oto_state.json:8", "write:oto_state.json:12",
                    "write:trainer_state.json:5", "write:trainer_state.json:12", "write:config.json:3",
                    "rename:1", "rename:9", "rename:16", "rmtree:2", "rmtree:11", "rmtree:21",
                    "fsync:1", "fsync:60"]
# save_compressed: its weights, config, model card, report, the rename into place, the final flush.
SAVE_KILLS = ["safetensors:13", "write:config.json:13", "write:README.md:1", "write:oto_report.json:1",
              "rename:22", "fsync:131"]
# A restarted run killed again.
REPEATED_KILLS = [("rename:9", "torch.save:10"), ("step:61", "write:oto_state.json:3")]
# Two processes, one killed (@rank): rank 1 mid-step, rank 1 while writing its RNG state into
# checkpoint-70, rank 0 before publishing checkpoint-50, rank 0 while writing the compressed weights.
DDP_KILLS = ["step:37@1", "torch.save:7@1", "rename:6@0", "safetensors:13@0"]


def _spawn(ctx, out: str, kill: str | None, log: str) -> int:
    proc = ctx.Process(target=crash_train.run_logged, args=(out, kill, log))
    proc.start()
    proc.join(timeout=300)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"{out} with kill {kill} did not finish")
    return proc.exitcode


def _torchrun(out: str, kill: str | None) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__)), "OMP_NUM_THREADS": "1",
           "HF_OTO_CRASH_OUT": out}
    env.pop("HF_OTO_CRASH_AT", None)
    if kill:
        env["HF_OTO_CRASH_AT"] = kill
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), crash_train.__file__]
    # A new session, so that a hung run can be killed with its workers.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out_text, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out_text[-3000:])


def _tail(log: str) -> str:
    with open(log) as f:
        return f.read()[-3000:]


def _same_folder(a: str, b: str) -> list[str]:
    """Files that differ between two folders (by bytes)."""
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return mismatch + errors


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["crash_train"])
    yield ctx
    from multiprocessing import forkserver as server

    server._forkserver._stop()  # frees the preloaded libraries' memory for the rest of the suite


@pytest.fixture(scope="module")
def reference(forkserver, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    out = str(root / "out")
    code = _spawn(forkserver, out, None, str(root / "log"))
    assert code == 0, _tail(str(root / "log"))
    with open(os.path.join(out, "result-rank0.json")) as f:
        result = json.load(f)
    result["out"] = out
    return result


def _after_kill(out: str, kill: str, reference: dict) -> str | None:
    """What a kill left under final names: complete checkpoints, the whole compressed folder or none."""
    for folder in checkpoint_folders(out):
        status = inspect_checkpoint(folder)
        if not status.complete:
            return f"{kill}: {folder} is under its final name but incomplete: {status}"
    compressed = os.path.join(out, "compressed")
    if os.path.exists(compressed) and _same_folder(compressed, os.path.join(reference["out"], "compressed")):
        return f"{kill}: a different compressed folder is under its final name"
    return None


def _scenario(ctx, root: str, kills: tuple[str, ...], reference: dict) -> str | None:
    """Run with each kill in turn, then to the end; a description of what went wrong, or None."""
    out = os.path.join(root, "out")
    os.makedirs(root)
    for i, kill in enumerate(kills):
        log = os.path.join(root, f"log-{i}")
        code = _spawn(ctx, out, kill, log)
        if code != -signal.SIGKILL:
            return f"{kill}: the run ended with {code} instead of being killed\n{_tail(log)}"
        problem = _after_kill(out, kill, reference)
        if problem:
            return problem
    log = os.path.join(root, "log-end")
    code = _spawn(ctx, out, None, log)
    if code != 0:
        return f"{kills}: the restart failed with {code}\n{_tail(log)}"
    with open(os.path.join(out, "result-rank0.json")) as f:
        result = json.load(f)
    problems = [k for k in ("weights", "compressed") if result[k] != reference[k]]
    differ = _same_folder(os.path.join(out, "compressed"), os.path.join(reference["out"], "compressed"))
    leftovers = [e for e in os.listdir(out) if e.startswith(LEFTOVER_PREFIX)]
    if problems or differ or leftovers:
        return f"{kills}: different {problems}, compressed files differ {differ}, leftovers {leftovers}"
    return None


def test_reference_run_reaches_every_kill_point(reference):
    """Each kill point names an event the uninterrupted run really has, so every kill happens."""
    counts = reference["counts"]
    for kill in STEP_KILLS + CHECKPOINT_KILLS + SAVE_KILLS:
        event, _, n = kill.rpartition(":")
        assert 1 <= int(n) <= counts.get(event, 0), (kill, counts.get(event))
    # The last events are the compressed folder's: its weights, its rename, the final flush.
    assert counts["safetensors"] == 13 and counts["rename"] == 22 and counts["fsync"] == 131, counts
    assert counts["step"] == crash_train.MAX_STEPS


def test_every_kill_resumes_bit_exact(forkserver, reference, tmp_path):
    scenarios = [(k,) for k in STEP_KILLS + CHECKPOINT_KILLS + SAVE_KILLS] + REPEATED_KILLS
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda item: _scenario(forkserver, str(tmp_path / str(item[0])), item[1], reference),
                                 enumerate(scenarios)))
    failures = [o for o in outcomes if o is not None]
    assert not failures, f"{len(failures)} of {len(scenarios)} scenarios failed:\n" + "\n".join(failures)
    assert len(scenarios) >= 30


def test_ddp_kill_of_one_rank_resumes_both_bit_exact(tmp_path):
    reference = {"out": str(tmp_path / "reference")}
    run = _torchrun(reference["out"], None)
    assert run.returncode == 0, run.stdout
    results = []
    for rank in (0, 1):
        with open(os.path.join(reference["out"], f"result-rank{rank}.json")) as f:
            results.append(json.load(f))
    assert results[0]["weights"] == results[1]["weights"]  # the replicas agree
    reference.update(results[0])
    assert reference["counts"]["safetensors"] == 13 and reference["counts"]["rename"] >= 6
    assert results[1]["counts"]["torch.save"] >= 7  # rank 1 writes its RNG state into each checkpoint

    for kill in DDP_KILLS:
        out = str(tmp_path / kill.replace(":", "-").replace("@", "-rank"))
        run = _torchrun(out, kill)
        rank = kill.rpartition("@")[2]
        assert run.returncode != 0 and os.path.exists(f"{out}.killed-rank{rank}"), (kill, run.stdout)
        problem = _after_kill(out, kill, reference)
        assert problem is None, problem
        run = _torchrun(out, None)
        assert run.returncode == 0, (kill, run.stdout)
        for rank in (0, 1):
            with open(os.path.join(out, f"result-rank{rank}.json")) as f:
                result = json.load(f)
            assert result["resumed"], kill
            assert (result["weights"], result["compressed"]) == (reference["weights"], reference["compressed"]), kill
        assert not _same_folder(os.path.join(out, "compressed"), os.path.join(reference["out"], "compressed")), kill
        assert not [e for e in os.listdir(out) if e.startswith(LEFTOVER_PREFIX)], kill
