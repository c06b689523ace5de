"""``OTOTrainer``: train once with a compression method, then build, check and save the small model.

It is a plain :class:`transformers.Trainer` subclass: the training loop is Trainer's own. OTO work
happens in the documented hooks: ``train`` (find the groups and validate everything before the
first step, then build the compressed model after the last), ``create_optimizer``,
``compute_loss`` (a method's regulariser), ``log`` (group sparsity, kept parameters and FLOPs),
a callback (per-step schedules), ``_save_checkpoint`` (checkpoints written aside and renamed
into place with the OTO state, see :mod:`hf_oto.checkpoints`) and ``push_to_hub``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shlex
import shutil
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import clean_leftovers, publish_dir, staging_path
from .checkpoints import (OTO_CHECKPOINT_FILE, find_resumable_checkpoint, inspect_checkpoint, rotate_checkpoints,
                          write_oto_state)
from .compress import save_pretrained as save_compressed_model
from .fsdp import broadcast_object, check_sharding, gather_dense_model, is_sharded
from .graph import find_groups
from .groups import ZeroInvariantGroups
from .hub import CompressionReport, build_model_card, dataset_names, describe_inputs, layer_table, push_folder
from .measure import (GPU_ALIGNMENT, CompressionEstimator, count_flops, measure_latency, num_parameters,
                      unaligned_widths)
from .methods import CompressionMethod, TrainingSettings, get_method
from .plots import save_plots, training_curve
from .precision import own_forward
from .training_args import OTOTrainingArguments

logger = logging.getLogger(__name__)

#: The optimizer's pruning-schedule state in an FSDP checkpoint (accelerate saves torch's part only).
OTO_OPTIMIZER_FILE = "oto_optimizer.pt"
# Metric values of an exact compression may differ by float summation order only.
_METRIC_RTOL = 1e-4


class OTOTrainer(Trainer):
    """Train once with Only-Train-Once, then get the physically smaller model.

    Args:
        model, args, ...: as for :class:`transformers.Trainer`; ``args`` must be
            :class:`OTOTrainingArguments`.
        example_inputs: inputs for the dependency trace (default: the first training batch).
        groups: precomputed :class:`ZeroInvariantGroups` (default: found from the inputs).
        method: a :class:`~hf_oto.methods.CompressionMethod` instance, overriding ``args.oto_method``.

    Multi-process: DDP, and FSDP2 (``fsdp_config={"fsdp_version": 2}`` or an accelerate FSDP2
    config) for the group-sparsity methods. Under FSDP2 rank 0 gathers the weights after training
    and builds the compressed model: ``compressed_model`` is set on rank 0 only, ``oto_report`` on
    every rank (see :mod:`hf_oto.fsdp`). DeepSpeed ZeRO and FSDP1 are refused.

    Example:
        >>> args = OTOTrainingArguments(output_dir="out", oto_method="dhspg", target_group_sparsity=0.5)
        >>> trainer = OTOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
        ...                      processing_class=tokenizer)            # doctest: +SKIP
        >>> trainer.train()                 # the redundant groups end exactly zero   # doctest: +SKIP
        >>> trainer.save_compressed()       # out/compressed: small model, manifest, model card  # doctest: +SKIP
        >>> trainer.push_to_hub()           # pushes the compressed model and its card  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module | None = None, args: OTOTrainingArguments | None = None, *,
                 example_inputs: Any = None, groups: ZeroInvariantGroups | None = None,
                 method: CompressionMethod | None = None, **kwargs: Any) -> None:
        if args is None:
            args = OTOTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, OTOTrainingArguments):
            raise TypeError(f"OTOTrainer needs OTOTrainingArguments, got {type(args).__name__}")
        if kwargs.get("model_init") is not None:
            raise ValueError("OTOTrainer does not support model_init: the groups and the compression method are "
                             "bound to one model instance; pass model= instead")
        super().__init__(model=model, args=args, **kwargs)
        if method is None:
            try:
                method = get_method(args.oto_method)(**args.oto_method_kwargs)
            except TypeError as err:
                raise ValueError(f"bad oto_method_kwargs for {args.oto_method!r}: {err}") from None
        #: FSDP2: the optimizer works on row shards; rank 0 gathers the weights and compresses.
        self._oto_sharded = check_sharding(self.accelerator, self.is_deepspeed_enabled, self.is_fsdp_enabled, method)
        if self._oto_sharded and args.oto_post_quantize is not None:
            raise ValueError("oto_post_quantize is not supported under FSDP2 yet: quantize the saved compressed "
                             "model (hf_oto.methods.opq.quantize) after training")
        self.oto_method = method
        self.oto_groups = groups
        self.compressed_model: nn.Module | None = None
        self.oto_report: CompressionReport | None = None
        self._oto_example_inputs = example_inputs
        self._oto_estimator: CompressionEstimator | None = None
        self._oto_ready = False
        self._oto_saved_dir: str | None = None
        self._oto_staging_dir: str | None = None  # while a checkpoint is written aside
        self._oto_push_pending = False
        self._oto_command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)
        self.add_callback(_OTOCallback(self))

    # -- set-up, all before the first training step ----------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """Validate and set up OTO, run Trainer's training loop, then build the compressed model.

        ``resume_from_checkpoint=True`` takes the newest complete checkpoint of ``output_dir``,
        skipping, with a warning, any that a crash left incomplete.
        """
        self._oto_clean_output_dir()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._oto_last_checkpoint()
        if not self._oto_ready:
            self._oto_setup(resume_from_checkpoint or None)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        self._oto_finish()
        return result

    def _oto_setup(self, checkpoint: str | None = None) -> None:
        if self.train_dataset is None:
            raise ValueError("OTOTrainer.train needs a train_dataset")
        if is_sharded(self.model):
            raise ValueError("the model is already sharded (its parameters are DTensors): OTOTrainer traces the dense "
                             "model for its groups, then accelerate shards it. Pass the unsharded model (under FSDP2, "
                             "do not evaluate or train it with another Trainer first), or gather it back with "
                             "hf_oto.fsdp.gather_dense_model(model, everywhere=True)")
        batch = self._first_batch()
        model = self.model
        inputs = self._oto_inputs = self._trace_inputs(self._example_inputs() or batch)
        if self.oto_method.needs_groups:
            if self.oto_groups is None:
                self.oto_groups = find_groups(model, inputs, self.args.group_config())
            else:
                self.oto_groups.check_model(model)
            self._check_groups(self.oto_groups)
            self._oto_estimator = CompressionEstimator(model, self.oto_groups, inputs)
            flops = self._oto_estimator.total_flops
        else:
            flops = count_flops(model, inputs)
        self._oto_dense = {"params": num_parameters(model), "flops": flops}
        if checkpoint:
            # The method's state (e.g. OPQ's allocation) must be back before prepare() rebuilds the
            # layers that the checkpoint's weights belong to.
            self._oto_check_checkpoint(checkpoint)
        prepared = self.oto_method.prepare(model, self.oto_groups)
        if prepared is not model:
            self.model = self.model_wrapped = prepared
        self._probe_loss_scaling(batch)
        self._oto_ready = True

    def _first_batch(self) -> dict[str, Any]:
        """The first training batch, checked for the columns the model needs, without disturbing
        any RNG (a resumed run must see the same data order as an uninterrupted one)."""
        states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        try:
            batch = next(iter(self.get_train_dataloader()))
        except StopIteration:
            raise ValueError("the training dataset is empty") from None
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
        batch = self._prepare_inputs(batch)
        self._check_columns(batch)
        return batch

    def _example_inputs(self) -> Any:
        """The user's inputs for the dependency trace, if any (``example_inputs=`` or a file)."""
        source = self._oto_example_inputs
        if source is None and self.args.oto_example_inputs != "first_batch":
            path = self.args.oto_example_inputs
            if not os.path.isfile(path):
                raise ValueError(f"oto_example_inputs must be 'first_batch' or a file, got {path!r}")
            source = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(source, Mapping):
            return self._prepare_inputs(dict(source))
        return source

    def _check_columns(self, batch: dict[str, Any]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        main = getattr(model, "main_input_name", None)
        present = sorted(batch)
        if main and main not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"the training batches have no '{main}' column, the input of {type(model).__name__}; "
                             f"they have {present}. Check the dataset's columns and the data collator.")
        if self.compute_loss_func is None and type(self).compute_loss is OTOTrainer.compute_loss:
            missing = [name for name in self.label_names if name not in batch]
            if missing:
                raise ValueError(
                    f"the training batches have no column(s) {missing}, which {type(model).__name__} needs to "
                    f"compute its loss; they have {present}. Add them to the dataset (or set label_names).")

    def _trace_inputs(self, batch: Any) -> Any:
        """At most two examples of the batch, without labels: the trace and the FLOP counts
        concern the model, not its loss."""
        if not isinstance(batch, Mapping):  # a tokenizer's collator gives a BatchEncoding, not a dict
            return batch
        batch = {k: v for k, v in batch.items() if k not in self.label_names and k != "labels"}
        size = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if size is None:
            return batch
        return {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
                for k, v in batch.items()}

    def _check_groups(self, groups: ZeroInvariantGroups) -> None:
        name = type(self.model).__name__
        if groups.num_prunable == 0:
            raise ValueError(f"{name} has no prunable group with these settings; see find_groups(...).summary():\n"
                             + groups.summary())
        target = self.args.target_group_sparsity
        if target is not None and math.ceil(target * groups.num_prunable) >= groups.num_prunable:
            raise ValueError(f"target_group_sparsity={target} would remove all {groups.num_prunable} prunable groups "
                             f"of {name}; choose a smaller target")

    def _probe_loss_scaling(self, batch: Any) -> None:
        """Trainer multiplies the loss by the number of processes whenever the model accepts loss
        kwargs, assuming it divides by the global item count; models that average their own loss
        (classification, vision) then train with a world-size-times larger gradient. Ask the model."""
        if not (self.model_accepts_loss_kwargs and isinstance(batch, Mapping) and "labels" in batch):
            return
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                n = torch.tensor(float(batch["labels"].numel()), device=batch["labels"].device)
                first = model(**batch, num_items_in_batch=n)
                second = model(**batch, num_items_in_batch=2 * n)
            uses_it = not torch.allclose(_loss_of(first), _loss_of(second))
        except TypeError:
            uses_it = False
        finally:
            model.train(was_training)
        if not uses_it:
            self.model_accepts_loss_kwargs = False

    # -- training hooks ------------------------------------------------------------------------------
    def training_settings(self) -> TrainingSettings:
        """What the method gets to build its optimizer and schedule."""
        args = self.args
        total = int(self.state.max_steps or 0)
        start, end = args.pruning_steps(total) if total else (0, 0)
        return TrainingSettings(
            learning_rate=args.learning_rate, weight_decay=args.weight_decay, total_steps=total,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
            options=dict(args.oto_method_kwargs), target_group_sparsity=args.target_group_sparsity,
            variant=args.oto_variant, pruning_start_step=start, pruning_end_step=end,
            pruning_periods=args.oto_pruning_periods,
            decay_parameter_names=self.get_decay_parameter_names(self.model),
            selection=args.selection().to_dict(), example_inputs=self._oto_inputs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self._oto_ready:
            optimizer = self.oto_method.create_optimizer(self.model, self.oto_groups, self.training_settings())
            if optimizer is not None:
                self.optimizer = optimizer
        return super().create_optimizer(model)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        penalty = self.oto_method.regularizer(self.accelerator.unwrap_model(model))
        if penalty is None:
            return result
        if return_outputs:
            return result[0] + penalty, result[1]
        return result + penalty

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._oto_ready and "loss" in logs:
            logs.update(self.oto_metrics())
        super().log(logs, start_time)

    def oto_metrics(self) -> dict[str, float]:
        """Group sparsity and what the model would keep if compressed now."""
        model = self.accelerator.unwrap_model(self.model)
        metrics = dict(self.oto_method.metrics(model, self.oto_groups))
        if self.oto_groups is not None and self._oto_estimator is not None:
            zero = self.oto_method.zero_groups(model, self.oto_groups)
            metrics.setdefault("group_sparsity", float(zero.sum()) / max(1, self.oto_groups.num_prunable))
            metrics.setdefault("num_zero_groups", float(zero.sum()))
            params, flops = self._oto_estimator.estimate(zero)
            metrics["kept_params"] = params
            metrics["kept_flops"] = flops
            metrics["kept_params_ratio"] = params / self._oto_dense["params"]
            metrics["kept_flops_ratio"] = flops / max(1, self._oto_dense["flops"])
        return metrics

    # -- after training ---------------------------------------------------------------------------
    def _oto_finish(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        groups = self.oto_groups
        removed = self.oto_method.zero_groups(model, groups) if groups is not None else None
        if self._oto_sharded:
            self._oto_finish_sharded(model, removed)
            return
        # In float32 (not through a bf16/fp16 autocast wrapper): compress's exactness check, the
        # metric check and the latency compare like with like, and the copy gets no wrapper.
        with own_forward(model):
            small = self.oto_method.finalize(model, groups)
            if self.oto_method.removed_groups is not None:  # it removed groups that were not zero
                removed = self.oto_method.removed_groups
            self.compressed_model = small
            self._oto_warn_unaligned(model, small)
            self.oto_report = self._oto_build_report(model, small, removed)
            if self.eval_dataset is not None and self.args.oto_check_compressed:
                self._check_compressed_metrics()
            if self.args.oto_post_quantize is not None:
                self._post_quantize(self._oto_inputs)
        report = self.oto_report
        self.log({"compressed_params": report.params_after, "compressed_flops": report.flops_after})

    def _oto_warn_unaligned(self, model: nn.Module, small: nn.Module) -> None:
        aligned = (self.args.oto_group_divisible, self.args.oto_width_multiple)
        if any(n % GPU_ALIGNMENT == 0 for n in aligned) or not self.is_world_process_zero():
            return
        unaligned = unaligned_widths(model, small)
        if unaligned:
            logger.warning(
                "%d pruned widths are not multiples of %d (%s): bf16/fp16 GPU kernels run such shapes "
                "slowly, and the compressed model may be slower than the dense one on a GPU (BERT-base's shape at "
                "half the FLOPs on an H200: 0.74x, against 1.50x when aligned). For GPU inference train with "
                "oto_width_multiple=%d.", len(unaligned), GPU_ALIGNMENT, ", ".join(unaligned[:3])
                + (", ..." if len(unaligned) > 3 else ""), GPU_ALIGNMENT)

    def _oto_finish_sharded(self, model: nn.Module, removed: torch.Tensor) -> None:
        """FSDP2: rank 0 gathers the full weights, compresses (outputs checked by ``compress``) and
        reports; the other ranks get the report only (``compressed_model`` stays None there). The
        metric check on the eval set is skipped: evaluating would need every rank."""
        dense = gather_dense_model(model)
        report = None
        if dense is not None:
            self.compressed_model = self.oto_method.finalize(dense, self.oto_groups)
            report = self._oto_build_report(dense, self.compressed_model, removed)
        self.oto_report = broadcast_object(report)
        self.log({"compressed_params": self.oto_report.params_after,
                  "compressed_flops": self.oto_report.flops_after})

    def _oto_build_report(self, model: nn.Module, small: nn.Module, removed: torch.Tensor | None) -> CompressionReport:
        groups = self.oto_groups
        inputs = self._oto_inputs
        report = CompressionReport(
            model_class=type(model).__name__.removeprefix("HfOto"), method=self.oto_method.name or "custom",
            base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            datasets=dataset_names(self.train_dataset), exact=self.oto_method.exact,
            params_before=self._oto_dense["params"], params_after=num_parameters(small),
            flops_before=self._oto_dense["flops"], flops_after=count_flops(small, inputs),
            flops_inputs=describe_inputs(inputs), settings=self.args.oto_summary(), command=self._oto_command,
            training_log=training_curve(self.state.log_history))
        if self.oto_method.uses_pruning_window and self.state.max_steps:
            report.pruning_window = list(self.args.pruning_steps(self.state.max_steps))
        if groups is not None and removed is not None:
            removed = groups.feasible_removal(removed)
            report.layers = layer_table(groups, removed)
            report.num_prunable_groups = groups.num_prunable
            report.num_removed_groups = int((removed & groups.prunable_mask).sum())
        if self.args.oto_measure_latency and self.is_world_process_zero():
            report.latency_before_s, report.latency_after_s = measure_latency(model, small, inputs=inputs)
        return report

    def _post_quantize(self, inputs: Any) -> None:
        """One-shot pruning-quantization (OPQ) of the compressed model, as a last step."""
        from .methods.opq import compression_report, quantize

        quantized = quantize(self.compressed_model, **self.args.oto_post_quantize)
        stats = compression_report(quantized)
        self.oto_report.quantization = {k: stats[k] for k in ("compression_rate", "bits_per_weight", "bytes")
                                        if k in stats}
        self.oto_report.exact = False
        self.compressed_model = quantized
        if self.eval_dataset is not None and self.args.oto_check_compressed:
            self.oto_report.metrics["quantized"] = _quality_metrics(self.evaluate_compressed(metric_key_prefix="eval"))

    def evaluate_compressed(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate the compressed model with this trainer's data, collator and metrics."""
        if self.compressed_model is None:
            raise ValueError("there is no compressed model yet: call train() first")
        saved = self.model, self.model_wrapped
        self.model = self.model_wrapped = self.compressed_model
        try:
            return self.evaluate(eval_dataset, metric_key_prefix=metric_key_prefix)
        finally:
            self.model, self.model_wrapped = saved

    def _check_compressed_metrics(self) -> None:
        sparse = self.evaluate(metric_key_prefix="eval")
        compressed = self.evaluate_compressed(metric_key_prefix="eval")
        sparse, compressed = _quality_metrics(sparse), _quality_metrics(compressed)
        self.oto_report.metrics.update({"sparse": sparse, "compressed": compressed})
        if not self.oto_method.exact:
            return
        differ = {k: (v, compressed.get(k)) for k, v in sparse.items()
                  if compressed.get(k) is None or abs(v - compressed[k]) > _METRIC_RTOL * max(1.0, abs(v))}
        if differ:
            raise RuntimeError(f"the compressed model's metrics differ from the sparse model's: {differ}")

    def save_compressed(self, output_dir: str | None = None) -> str:
        """Write the compressed model, the processing class, ``oto_report.json`` and the model card
        (with ``training.png`` and ``layers.png`` embedded when matplotlib is installed).

        The folder is written next to its destination and moved into place at the end, so a
        failure never leaves a half-written or overwritten result. Returns the folder.
        """
        if self.oto_report is None or (self.compressed_model is None and not self._oto_sharded):
            raise ValueError("there is no compressed model yet: call train() first")
        target = os.path.abspath(output_dir or os.path.join(self.args.output_dir, self.args.oto_compressed_dir))
        if self.is_world_process_zero():
            clean_leftovers(os.path.dirname(target), os.path.basename(target))
            staging = staging_path(target)
            try:
                why = save_compressed_model(self.compressed_model, staging)
                self.oto_report.standard_config, self.oto_report.standard_config_reason = not why, why
                if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                    self.processing_class.save_pretrained(staging)
                self.oto_report.save(os.path.join(staging, "oto_report.json"))
                repo = self.args.hub_model_id or os.path.basename(target)
                images = save_plots(staging, self.oto_report)
                build_model_card(self.oto_report, repo, images).save(os.path.join(staging, "README.md"))
                publish_dir(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.accelerator.wait_for_everyone()
        self._oto_saved_dir = target
        return target

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs: Any):
        """Push the compressed model and its card (before compression: Trainer's own push)."""
        if self.compressed_model is None and self.oto_report is None:  # (FSDP2: only rank 0 holds it)
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token,
                                       revision=revision, **kwargs)
        folder = self._oto_saved_dir or self.save_compressed()
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_folder(folder, repo_id, token=token or self.args.hub_token,
                           private=self.args.hub_private_repo, commit_message=commit_message or "Upload",
                           revision=revision, blocking=blocking)

    # -- checkpoints -------------------------------------------------------------------------------
    def oto_fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this trainer."""
        groups = self.oto_groups
        names = "|".join(groups.param_names) if groups is not None else ""
        return {
            "settings": {k: v for k, v in self.args.oto_summary().items()
                         if k not in ("oto_compressed_dir", "oto_check_compressed", "oto_measure_latency")},
            "groups": len(groups) if groups is not None else 0,
            "prunable": groups.num_prunable if groups is not None else 0,
            "params": hashlib.sha256(names.encode()).hexdigest()[:16],
        }

    def _oto_clean_output_dir(self) -> None:
        """Remove what a crash left half-written in ``output_dir`` (before any process looks for
        checkpoints in it)."""
        if self.args.should_save:
            clean_leftovers(self.args.output_dir)
        self.accelerator.wait_for_everyone()

    def _oto_last_checkpoint(self) -> str:
        found, skipped = find_resumable_checkpoint(self.args.output_dir)
        incomplete = "; ".join(f"{os.path.basename(s.path)} lacks {', '.join(s.missing)}" for s in skipped)
        if found is None:
            raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from"
                             + (f" (incomplete: {incomplete})" if incomplete else ""))
        if skipped and self.is_world_process_zero():
            warnings.warn(f"skipping incomplete checkpoint(s) in {self.args.output_dir} ({incomplete}); "
                          f"resuming from {os.path.basename(found.path)}", stacklevel=3)
        return found.path

    def _oto_check_checkpoint(self, checkpoint: str) -> None:
        status = inspect_checkpoint(checkpoint)
        if status.foreign:
            raise ValueError(f"{checkpoint} was not written by OTOTrainer (no {OTO_CHECKPOINT_FILE}); "
                             "it cannot be resumed with OTO state")
        if status.missing:
            raise ValueError(f"{checkpoint} is incomplete (a run stopped while writing it?): missing "
                             f"{', '.join(status.missing)}. Resume from an earlier checkpoint, or pass "
                             "resume_from_checkpoint=True to take the newest complete one.")
        with open(os.path.join(checkpoint, OTO_CHECKPOINT_FILE)) as f:
            saved = json.load(f)
        current = json.loads(json.dumps(self.oto_fingerprint(), default=str))
        if saved.get("fingerprint") != current:
            diff = {k: (saved.get("fingerprint", {}).get(k), v) for k, v in current.items()
                    if saved.get("fingerprint", {}).get(k) != v}
            raise ValueError(f"checkpoint {checkpoint} comes from another OTO configuration: (saved, now) = {diff}")
        self.oto_method.load_state_dict(saved.get("method_state", {}))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written aside, completed with ``oto_state.json`` and renamed into
        place: a ``checkpoint-N`` folder is complete or absent, whenever the run is killed.

        Trainer writes straight into ``checkpoint-N`` and rotates inside the same call; pointing
        its output folder (``_get_output_dir``) at a staging folder for the duration keeps both its
        writes and its rotation away from the real checkpoints, so its own code does the saving.
        """
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging_root = staging_path(final, unique=False)  # every process writes its RNG state here
        staged = os.path.join(staging_root, name)
        if self.args.should_save and os.path.lexists(staging_root):
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        self._oto_staging_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._oto_staging_dir = None
        self.accelerator.wait_for_everyone()  # every process's files are in
        if self.args.should_save:
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            write_oto_state(staged, {"fingerprint": self.oto_fingerprint(),
                                     "method_state": self.oto_method.state_dict(), "world_size": self.args.world_size})
            publish_dir(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, protect=(final, self.state.best_model_checkpoint))
        self.accelerator.wait_for_everyone()
        if self._oto_push_pending:
            self._oto_push_pending = False
            super()._push_from_checkpoint(final)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # FSDP: accelerate saves the sharded torch state only; the schedule's state goes beside it.
        if self._oto_sharded and self.args.should_save:
            torch.save(self.oto_method.optimizer.oto_state_dict(), os.path.join(output_dir, OTO_OPTIMIZER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self._oto_sharded and self.optimizer is not None:
            optimizer = self.oto_method.optimizer
            path = os.path.join(checkpoint, OTO_OPTIMIZER_FILE)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {OTO_OPTIMIZER_FILE}: it was not written by OTOTrainer under FSDP2")
            optimizer.expect_oto_state(torch.load(path, weights_only=True))
            # A distributed checkpoint loads into existing state; torch's fallback would take a
            # zero-lr step, which advances (and may project in) the pruning schedule.
            optimizer.init_state()
        super()._load_optimizer_and_scheduler(checkpoint)

    def _get_output_dir(self, trial: Any) -> str:
        return self._oto_staging_dir or super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes from inside _save_checkpoint, before the OTO state is in: push the
        # complete folder once it is in place.
        if self._oto_staging_dir is not None:
            self._oto_push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)


class _OTOCallback(TrainerCallback):
    """Per-step method schedules."""

    def __init__(self, trainer: OTOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._oto_ready:
            trainer.oto_method.on_step_end(trainer.accelerator.unwrap_model(trainer.model), state.global_step)


def _loss_of(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output[0]


def _quality_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Evaluation numbers that describe the model, not the run (no runtime, throughput, epoch)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))
            and not k.endswith(("runtime", "per_second", "epoch"))}


__all__ = ["OTOTrainer", "OTO_CHECKPOINT_FILE"]
