"""Train a tiny BERT-QA with OTOTrainer and save the compressed model, dying by SIGKILL where told.

Run by tests/test_crash_resume.py, in a process forked from a server that has the libraries
loaded (one process, :func:`run`), or under torchrun (two processes)::

    HF_OTO_CRASH_OUT=out HF_OTO_CRASH_AT=step:37@1 torchrun --nproc_per_node 2 tests/crash_train.py

A run resumes with ``resume_from_checkpoint=True`` when ``out`` holds a ``checkpoint-N`` folder.
``HF_OTO_CRASH_AT`` is ``<event>:<n>[@<rank>]``: the process (of that rank) kills itself with
SIGKILL at the n-th such event:

- ``step``: before an optimizer step (gradients computed, weights not updated yet);
- ``stepped``: after an optimizer step, before the scheduler and the OTO schedule;
- ``train_end``: after the last step, before the compressed model is built;
- ``torch.save``: half-way through writing a ``torch.save`` file (optimizer, scheduler, RNG);
- ``safetensors``: half-way through writing model weights (checkpoints, compressed model);
- ``write:<file name>``: half-way through writing a file of that name (``oto_state.json``,
  ``trainer_state.json``, ``config.json``, ``README.md``, ``oto_report.json``...);
- ``rename``: before an ``os.replace`` (publishing a checkpoint or the compressed folder);
- ``rmtree``: after deleting one file of a folder being deleted (rotation, leftovers);
- ``fsync``: before an ``os.fsync``.

Every complete run writes ``result-rank<r>.json``: hashes of the trained and the compressed
weights, and how many events of each kind happened, in all and by the end of the training loop
(the tests place their kill points with it). A process about to
kill itself first creates ``<out>.killed-rank<r>``.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import signal
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers.modeling_utils  # noqa: E402
from trainer_utils import qa_data, qa_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402

MAX_STEPS = 120
SAVE_STEPS = 10


class _Faults:
    """Counts the events above and dies at the chosen one."""

    def __init__(self, spec: str | None, rank: int, marker: str) -> None:
        self.counts: Counter[str] = Counter()
        self.at_train_end: dict[str, int] = {}  # the counts when the training loop ended
        self.marker = marker
        self.event, self.n = None, 0
        if spec:
            spec, _, only_rank = spec.partition("@")
            event, _, n = spec.rpartition(":")
            if not only_rank or int(only_rank) == rank:
                self.event, self.n = event, int(n)

    def hit(self, event: str) -> bool:
        self.counts[event] += 1
        return event == self.event and self.counts[event] == self.n

    def die(self) -> None:
        sys.stdout.flush()
        os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT, 0o644))  # proof that the kill came from here
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        faults = self
        real_open, real_save, real_safe = builtins.open, torch.save, transformers.modeling_utils.safe_save_file
        real_replace, real_rmtree, real_fsync = os.replace, shutil.rmtree, os.fsync

        def torn(path, data: bytes) -> None:
            with real_open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            faults.die()

        def save(obj, f, *args, **kwargs):
            if faults.hit("torch.save") and isinstance(f, (str, os.PathLike)):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                torn(f, buffer.getvalue())
            return real_save(obj, f, *args, **kwargs)

        def safe_save_file(tensors, filename, metadata=None):
            if faults.hit("safetensors"):
                torn(filename, safetensors.torch.save(tensors, metadata=metadata))
            return real_safe(tensors, filename, metadata=metadata)

        class TornFile:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                self._f.write(data[: len(data) // 2])
                self._f.flush()
                faults.die()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._f, name)

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                if faults.hit("write:" + os.path.basename(os.fspath(file))):
                    return TornFile(f)
            return f

        def replace(src, dst, *args, **kwargs):
            if faults.hit("rename"):
                faults.die()
            return real_replace(src, dst, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            if faults.hit("rmtree"):
                for root, _dirs, files in os.walk(path):
                    if files:
                        os.remove(os.path.join(root, files[0]))
                        break
                faults.die()
            return real_rmtree(path, *args, **kwargs)

        def fsync(fd):
            if faults.hit("fsync"):
                faults.die()
            return real_fsync(fd)

        torch.save, transformers.modeling_utils.safe_save_file = save, safe_save_file
        builtins.open, os.replace, shutil.rmtree, os.fsync = open_, replace, rmtree, fsync


class _StepFaults(TrainerCallback):
    def __init__(self, faults: _Faults) -> None:
        self.faults = faults

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.faults.hit("step"):
            self.faults.die()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.faults.hit("stepped"):
            self.faults.die()

    def on_train_end(self, args, state, control, **kwargs):
        hit = self.faults.hit("train_end")
        self.faults.at_train_end = dict(self.faults.counts)
        if hit:
            self.faults.die()


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(out: str, kill: str | None = None) -> None:
    """One run: resume from ``out`` if it holds a checkpoint, train, compress, save."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    faults = _Faults(kill, rank, f"{out}.killed-rank{rank}")
    faults.install()
    args = OTOTrainingArguments(
        output_dir=out, oto_method="hesso", target_group_sparsity=0.4, max_steps=MAX_STEPS,
        oto_pruning_start=0.2, oto_pruning_end=0.7, oto_pruning_periods=3,
        per_device_train_batch_size=8 // int(os.environ.get("WORLD_SIZE", 1)), learning_rate=1e-3,
        logging_steps=10, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=3, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, oto_measure_latency=False, oto_check_compressed=False)
    trainer = OTOTrainer(model=qa_model(), args=args, train_dataset=qa_data(), callbacks=[_StepFaults(faults)])
    resume = os.path.isdir(out) and any(e.startswith("checkpoint-") for e in os.listdir(out))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_compressed()
    result = {"weights": weights_digest(trainer.accelerator.unwrap_model(trainer.model)),
              "compressed": weights_digest(trainer.compressed_model), "resumed": resume,
              "counts": dict(faults.counts), "counts_at_train_end": faults.at_train_end}
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def run_logged(out: str, kill: str | None, log: str) -> None:
    """:func:`run` with this process's output going to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    run(out, kill)


if __name__ == "__main__":
    run(os.environ["HF_OTO_CRASH_OUT"], os.environ.get("HF_OTO_CRASH_AT"))
