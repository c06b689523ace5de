"""The model card of a compressed model, and pushing the compressed folder to the Hub."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .plots import LAYERS_PNG, TRAINING_PNG

if TYPE_CHECKING:  # the report only reads groups; hub stays importable without the graph layer
    from .groups import ZeroInvariantGroups

# Model class suffix -> (pipeline task of the model-index, the Auto class that loads it)
_TASKS = [
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
]


@dataclass
class CompressionReport:
    """Everything the model card says about a compression run (JSON-serialisable)."""

    model_class: str
    method: str
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    exact: bool = True
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    flops_inputs: str = ""
    latency_before_s: float | None = None
    latency_after_s: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)  # {layer, kind, total, removed}
    num_prunable_groups: int = 0
    num_removed_groups: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {metric: value}
    settings: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)  # OPQ post-step: rate, bits/weight, bytes
    # The training logs the curves in training.png come from (step, loss, group_sparsity, kept_*),
    # and the optimizer steps where the method pruned (None: the method has no pruning window).
    training_log: list[dict[str, float]] = field(default_factory=list)
    pruning_window: list[int] | None = None
    standard_config: bool = False        # saved as its own class with a standard config (no remote code)
    standard_config_reason: str = ""     # else why the manifest is needed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionReport":
        with open(path) as f:
            return cls(**json.load(f))


# Evaluation keys that describe the run, not the model (eval_runtime, model_preparation_time, ...).
_RUN_METRICS = ("runtime", "_time", "per_second")


def task_of(model_class: str) -> tuple[str | None, str]:
    """``(pipeline task, Auto class)`` for a model class name such as ``HfOtoBertForQuestionAnswering``."""
    for suffix, task, auto in _TASKS:
        if model_class.endswith(suffix):
            return task, auto
    return None, "AutoModel"


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _target_line(settings: dict[str, Any]) -> str:
    """The run's target as set (FLOPs, parameters or a share of the groups)."""
    for key, what in (("target_kept_flops", "kept FLOPs"), ("target_kept_params", "kept parameters")):
        if settings.get(key) is not None:
            return f"{what} {settings[key]}"
    if settings.get("target_group_sparsity") is not None:
        return f"group sparsity {settings['target_group_sparsity']}"
    return ""


def build_model_card(report: CompressionReport, repo_or_path: str = "<path-or-repo-id>",
                     images: Sequence[str] = ()) -> ModelCard:
    """A model card with the compression figures, built without any network access.

    ``images`` are file names beside the card (``training.png``, ``layers.png``, written by
    :func:`hf_oto.plots.save_plots`), embedded with relative links so that they show on the Hub
    and in a local viewer alike.

    Example:
        >>> card = build_model_card(report, images=["training.png"])    # doctest: +SKIP
        >>> card.save("out/compressed/README.md")               # doctest: +SKIP
    """
    task, auto = task_of(report.model_class)
    final = report.metrics.get("compressed") or report.metrics.get("sparse") or {}
    results = []
    if task:
        for name, value in final.items():
            if isinstance(value, (int, float)) and not name.endswith(_RUN_METRICS + ("_steps", "epoch")):
                results.append(EvalResult(task_type=task, dataset_type=(report.datasets or ["custom"])[0],
                                          dataset_name=(report.datasets or ["custom"])[0],
                                          metric_type=name, metric_value=float(value)))
    data = ModelCardData(
        base_model=report.base_model or None,
        datasets=report.datasets or None,
        tags=["hf_oto", "structured-pruning", "only-train-once", report.method],
        library_name="transformers",
        pipeline_tag=task,
        model_name=f"{report.model_class} compressed with hf_oto ({report.method})",
        eval_results=results or None,
    )
    lines = [f"# {report.model_class} compressed with hf_oto ({report.method})", ""]
    lines += [
        "This model was trained once with Only-Train-Once structured pruning "
        f"(method `{report.method}`) and then physically compressed: the pruned attention heads, "
        "FFN neurons and channels are gone from the weights, not masked."
        + (" Its outputs equal the trained sparse model's." if report.exact else
           " The method removes structures that were not exactly zero, so outputs differ slightly from the "
           "trained model's."),
        "",
        "## Compression",
        "",
        "| | before | after | reduction |",
        "| --- | ---: | ---: | ---: |",
        f"| parameters | {_human(report.params_before)} | {_human(report.params_after)} | "
        f"{_ratio(report.params_before, report.params_after)} |",
        f"| FLOPs ({report.flops_inputs or 'example inputs'}) | {_human(report.flops_before)} | "
        f"{_human(report.flops_after)} | {_ratio(report.flops_before, report.flops_after)} |",
    ]
    if report.num_prunable_groups:
        kept = report.num_prunable_groups - report.num_removed_groups
        lines.append(f"| prunable groups (heads, neurons, channels) | {report.num_prunable_groups} | {kept} | "
                     f"{report.num_removed_groups / report.num_prunable_groups:.1%} removed |")
    if report.latency_before_s and report.latency_after_s:
        lines.append(f"| CPU latency | {report.latency_before_s * 1000:.1f} ms | {report.latency_after_s * 1000:.1f} ms "
                     f"| {_ratio(report.latency_before_s, report.latency_after_s)} |")
    if report.quantization:
        lines.append(f"| weights (OPQ) | 32 bits | {report.quantization.get('bits_per_weight', 0):.2f} bits | "
                     f"{report.quantization.get('compression_rate', 0):.2f}x |")
    kept = [f"{report.params_after / report.params_before:.1%} of the parameters" if report.params_before else "",
            f"{report.flops_after / report.flops_before:.1%} of the FLOPs" if report.flops_before else "",
            f"group sparsity {report.num_removed_groups / report.num_prunable_groups:.1%}"
            if report.num_prunable_groups else ""]
    target = _target_line(report.settings)
    if any(kept):
        lines += ["", "Kept: " + ", ".join(k for k in kept if k) + "." + (f" Target: {target}." if target else "")]
    if TRAINING_PNG in images:
        lines += ["", "## Training", "",
                  f"![Training loss, group sparsity and kept FLOPs against the optimizer steps; the pruning window "
                  f"is shaded]({TRAINING_PNG})"]
    if report.layers or LAYERS_PNG in images:
        lines += ["", "## What was removed"]
    if LAYERS_PNG in images:
        lines += ["", f"![Kept and removed heads, neurons and channels per layer]({LAYERS_PNG})"]
    if report.layers:
        lines += ["", "| layer | kind | groups | removed | kept |", "| --- | --- | ---: | ---: | ---: |"]
        for row in report.layers:
            if row["removed"] or row["kind"] != "hidden":
                lines.append(f"| `{row['layer'] or '<model>'}` | {row['kind']} | {row['total']} | {row['removed']} | "
                             f"{row['total'] - row['removed']} |")
    if report.metrics:
        names = sorted({k for stage in report.metrics.values() for k in stage
                        if not k.endswith(_RUN_METRICS)})
        stages = list(report.metrics)
        lines += ["", "## Evaluation", "", "| metric | " + " | ".join(stages) + " |",
                  "| --- |" + " ---: |" * len(stages)]
        for name in names:
            cells = [f"{report.metrics[s][name]:.4g}" if isinstance(report.metrics[s].get(name), (int, float))
                     else "-" for s in stages]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _loading_lines(report, auto, repo_or_path)
    lines += _export_lines(report, auto, repo_or_path)
    if report.command:
        lines += ["", "## Reproduce", "", "```bash", report.command, "```"]
    if report.settings:
        lines += ["", "## Settings", "", "```json", json.dumps(report.settings, indent=2, default=str), "```"]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")


def _loading_lines(report: CompressionReport, auto: str, repo_or_path: str) -> list[str]:
    lines = ["", "## How to load", "", "```python", f"from transformers import {auto}", ""]
    if report.standard_config:
        return lines + [
            f'model = {auto}.from_pretrained("{repo_or_path}")', "```", "",
            f"Every layer kept the same sizes, so `config.json` is a standard `{report.model_class}` config with the "
            "new sizes: the model loads in plain Transformers with no remote code and no hf_oto, and tools that read "
            "only standard configs (vLLM, TGI, llama.cpp conversion, Optimum/ONNX) accept it."]
    lines += [
        f'model = {auto}.from_pretrained("{repo_or_path}", trust_remote_code=True)',
        "",
        "# or, without running remote code (pip install hf_oto):",
        "import hf_oto",
        "",
        f'model = hf_oto.from_pretrained("{repo_or_path}")',
        "```",
        "",
        "The per-layer sizes are stored in `config.json` (`hf_oto_manifest`); `modeling_hf_oto.py` rebuilds the "
        "smaller layers before the weights load.",
    ]
    if report.standard_config_reason:
        lines += ["", f"Why not a standard config: {report.standard_config_reason}."]
    return lines


def _export_lines(report: CompressionReport, auto: str, repo_or_path: str) -> list[str]:
    load = (f'{auto}.from_pretrained("{repo_or_path}")' if report.standard_config
            else f'hf_oto.from_pretrained("{repo_or_path}")')
    return [
        "", "## How to export", "",
        "`torch.export` and the ONNX dynamo exporter (`pip install hf_oto[export]` for onnxscript) trace the "
        "compressed model like any Transformers model:", "", "```python", "import torch",
        f"from transformers import {auto}" if report.standard_config else "import hf_oto",
        f"model = {load}.eval()",
        "inputs = {...}  # a batch of the model's inputs, e.g. from its tokenizer or image processor",
        "program = torch.export.export(model, (), kwargs=inputs, strict=False)",
        'torch.onnx.export(model, (), kwargs=inputs, f="model.onnx", dynamo=True)',
        "```",
    ]


def dataset_names(dataset: Any) -> list[str]:
    """The name a ``datasets.Dataset`` was loaded under, for the card's metadata (none if unknown)."""
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    return [name] if name else []


def describe_inputs(inputs: Any) -> str:
    """``"input_ids [2, 16], ..."``: the inputs the FLOPs were counted on."""
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    return ""


def layer_table(groups: ZeroInvariantGroups, removed: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer and kind of group: how many prunable groups it had and how many were removed."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for g in groups:
        if not g.prunable and not removed[g.index]:
            continue
        row = rows.setdefault((g.layer, g.kind), {"layer": g.layer, "kind": g.kind, "total": 0, "removed": 0})
        row["total"] += 1
        row["removed"] += int(removed[g.index])
    return list(rows.values())


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model compressed with hf_oto",
    revision: str | None = None,
    blocking: bool = True,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` through Transformers' Hub client.

    ``transformers.utils.hub.hf_api()`` is the client Transformers itself uses (with the user's
    token, as ``Trainer.push_to_hub`` does); tests replace it with a recorder.
    """
    from transformers.utils import hub

    api = hub.hf_api()
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             token=token, revision=revision, run_as_future=not blocking)
