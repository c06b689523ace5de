"""Coverage of Transformers' model registry: what hf_oto finds prunable, and is it exact.

For every model type in Transformers' registry, one architecture (in this order of preference:
sequence-to-sequence LM, speech sequence-to-sequence, masked LM, causal LM, sequence
classification, image classification, audio classification / CTC, image-text-to-text, base model)
is built from the type's default config shrunk to a tiny size (2 layers, 4 heads of 16, FFN 128,
vocabulary 128, 64-pixel images, 4 experts). Then, per architecture:

* heads / neurons / channels / experts found prunable (of those found; whole experts with
  ``GroupConfig(prune_experts=True)``);
* exact: a random 40% of the prunable groups zeroed, ``compress`` (which checks the outputs);
* reload: the compressed model saved, then loaded in another process (``trust_remote_code`` and
  ``hf_oto.from_pretrained``), outputs equal bit for bit;
* generate: greedy ``generate()`` of the sparse and compressed models equal (decoders);
* or the reason it is not, naming the op and the module.

Each architecture runs in a worker process with a time limit; results are deterministic (fixed
seeds, one thread per worker, rows sorted by model type), so the committed docs/coverage.md can be
regenerated and diffed.

    python bench/coverage.py                                  # whole registry, table to stdout
    python bench/coverage.py --only llama bert 'qwen.*moe'    # model types matching these regexes
    python bench/coverage.py --output docs/coverage.md        # write the markdown report
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Architecture preference: (auto mapping, category).
MAPPINGS = [
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder-decoder"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech encoder-decoder"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "text encoder"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text decoder"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text encoder"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "audio"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "multimodal"),
    ("MODEL_MAPPING_NAMES", "other"),
]
GENERATES = {"encoder-decoder", "text decoder", "speech encoder-decoder"}

# Tiny sizes.
HEADS, HEAD_DIM, FFN, LAYERS, VOCAB, POSITIONS, IMAGE, EXPERTS = 4, 16, 128, 2, 128, 64, 64, 4
HIDDEN = HEADS * HEAD_DIM
SEQ, DECODER_SEQ, NEW_TOKENS = 13, 7, 5

_HIDDEN_NAMES = re.compile(r"^(hidden_size|d_model|n_embd|dim|embed_dim|model_dim|embedding_size|emb_dim|d_embed|"
                           r"word_embed_proj_dim|hidden_dim|projection_dim|text_embed_dim|vision_embed_dim)$")
_FFN_NAMES = re.compile(r"intermediate|ffn|inner|^d_ff$|mlp_dim|mlp_hidden|feed_forward")
_LAYER_NAMES = re.compile(r"^(num_hidden_layers|n_layers?|num_layers|encoder_layers|decoder_layers|"
                          r"num_encoder_layers|num_decoder_layers|depth)$")
_HEAD_NAMES = re.compile(r"^(num_attention_heads|n_heads?|num_heads|encoder_attention_heads|"
                         r"decoder_attention_heads|attention_heads|num_encoder_attention_heads|num_decoder_attention_heads)$")
_KV_NAMES = re.compile(r"key_value_heads|kv_heads|multi_query_group_num|num_kv")
_HEAD_DIM_NAMES = re.compile(r"^(head_dim|kv_channels|d_kv|attention_head_size|head_size|qk_head_dim|v_head_dim)$")
_POSITION_NAMES = re.compile(r"^(max_position_embeddings|n_positions|max_source_positions|max_target_positions|"
                             r"n_ctx|max_seq_len|max_sequence_length|seq_length)$")
_EXPERT_NAMES = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_experts_total)$")
_TOKEN_IDS = re.compile(r"_token_id$")


# -- building ---------------------------------------------------------------------------------------

def registry(only: list[str] | None) -> list[tuple[str, str, str]]:
    """(model type, architecture class name, category), sorted by model type."""
    from transformers.models.auto import configuration_auto, modeling_auto

    pattern = re.compile("|".join(f"(?:{p})" for p in only)) if only else None
    rows = []
    for model_type in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        if pattern is not None and not pattern.fullmatch(model_type):
            continue
        for mapping, category in MAPPINGS:
            arch = getattr(modeling_auto, mapping, {}).get(model_type)
            if isinstance(arch, (list, tuple)):
                arch = arch[0]
            if arch:
                rows.append((model_type, arch, category))
                break
        else:
            rows.append((model_type, "", "config only"))
    return rows


def shrink(config: Any, problems: list[str] | None = None) -> Any:
    """A config of the same class with every size made tiny, sub-configs included (see the module
    doc). The config is built again from its fields, so that what ``__post_init__`` derives from
    them (head dims, stage names, per-layer types) follows. A config whose validation rejects the
    tiny sizes gets them set one by one; ``problems`` receives why (saving it will fail)."""
    import dataclasses

    from transformers import PretrainedConfig

    cls = type(config)
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(vars(config))
    values = {n: getattr(config, n) for n in names if hasattr(config, n) and not n.startswith("_")}
    heads0 = next((v for k, v in values.items() if _HEAD_NAMES.match(k) and isinstance(v, int)), None)
    layers0 = next((v for k, v in values.items() if _LAYER_NAMES.match(k) and isinstance(v, int)), None)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        new = value
        if isinstance(value, PretrainedConfig):
            new = shrink(value, problems)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            new = _shrink_int(key, value, heads0)
            new = value if new is None else new
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value):
            shrunk = _shrink_list(key, list(value))
            new = value if shrunk is None else type(value)(shrunk)
        elif isinstance(value, (list, tuple)) and layers0 and len(value) == layers0:
            new = type(value)(list(value)[:LAYERS])  # one entry per layer (layer_types, ...)
        kwargs[key] = new
    vocab = kwargs.get("vocab_size")
    if isinstance(vocab, int):
        for key, value in kwargs.items():
            if _TOKEN_IDS.search(key) and isinstance(value, int) and value >= vocab:
                kwargs[key] = vocab - 1
    try:
        return cls(**kwargs)
    except Exception as exc:  # a config that rejects the tiny sizes: set them one by one instead
        if problems is not None:
            problems.append(_short(exc))
        for key, value in kwargs.items():
            if value is not values.get(key):
                _set(config, key, value)
        return config


def _shrink_int(key: str, value: int, heads0: int | None) -> int | None:
    if _LAYER_NAMES.match(key):
        return min(value, LAYERS)
    if _KV_NAMES.search(key):
        return value if value <= 1 else (HEADS if heads0 is not None and value == heads0 else HEADS // 2)
    if _HEAD_NAMES.match(key):
        return HEADS if value > 1 else value
    if _HEAD_DIM_NAMES.match(key):
        return HEAD_DIM
    if _HIDDEN_NAMES.match(key) and value > HIDDEN:
        return HIDDEN
    if _FFN_NAMES.search(key) and value > FFN and "ratio" not in key:
        return FFN
    if key in ("vocab_size", "unpadded_vocab_size") and value > VOCAB:  # Inkling 2's lm_head reads the latter
        return VOCAB
    if _POSITION_NAMES.match(key) and value > POSITIONS:
        return POSITIONS
    if key == "image_size" and value > IMAGE:
        return IMAGE
    if _EXPERT_NAMES.match(key) and value > EXPERTS:
        return EXPERTS
    if key in ("num_experts_per_tok", "moe_topk", "top_k") and value > 2:
        return 2
    if key == "window_size" and value > 2:
        return 2
    if re.search(r"first_k_dense|num_dense_layers", key):
        return min(value, 1)  # so that a 2-layer MoE keeps a sparse layer
    if key in ("n_group", "num_expert_group"):
        return min(value, 2)
    if key == "topk_group":
        return min(value, 1)
    return None


def _shrink_list(key: str, value: list[int]) -> list[int] | None:
    if key in ("depths", "num_layers", "layers_per_stage") or key.endswith("depths"):
        return [1] * len(value)
    if key in ("hidden_sizes", "embed_dims", "dims", "widths"):
        return [16 * 2 ** i for i in range(len(value))]
    if key == "num_heads" or key.endswith("attention_heads"):
        return [min(v, 2 ** i) for i, v in enumerate(value)]
    if key == "image_size":
        return [min(v, IMAGE) for v in value]
    return None


def _set(config: Any, key: str, value: Any) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # read-only properties are derived from other fields
        pass


def make_inputs(model: Any, config: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 100))
        ids = torch.randint(min(4, vocab - 1), vocab, (2, SEQ), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(min(4, vocab - 1), vocab, (2, DECODER_SEQ), generator=g)
        return inputs
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", IMAGE)
        size = size if isinstance(size, int) else int(size[0])
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=g)}
    if main == "input_values":
        return {"input_values": torch.randn(2, 4000, generator=g)}
    if main == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", 80)
        length = 2 * getattr(config, "max_source_positions", 32)
        inputs = {"input_features": torch.randn(2, bins, length, generator=g)}
        if getattr(config, "is_encoder_decoder", False):
            start = getattr(config, "decoder_start_token_id", None) or 1
            inputs["decoder_input_ids"] = torch.full((2, DECODER_SEQ), start, dtype=torch.long)
        return inputs
    raise ValueError(f"no example inputs for main input '{main}'")


# -- one architecture -------------------------------------------------------------------------------

def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"0x[0-9a-fA-F]+", "0x..", re.sub(r"/tmp/\S*hf_oto_coverage_\w+", "<out>", text))
    return f"{type(exc).__name__}: {text[:220]}"


# Dims the task fixes, which nobody expects to prune: the outputs, the vocabulary and position tables.
_FIXED_BY_TASK = re.compile(r"^dimension of the model output|^rows are looked up by index")


def _structures(groups: Any) -> list[Any]:
    """The groups that are structures of the network (see ``_FIXED_BY_TASK``)."""
    return [g for g in groups if g.prunable or not _FIXED_BY_TASK.search(g.reason)]


def _why(groups: list[Any], kind: str) -> str:
    """The most common reason a group of ``kind`` is not prunable."""
    reasons = Counter(g.reason for g in groups if g.kind == kind and not g.prunable)
    return reasons.most_common(1)[0][0] if reasons else ""


def run_one(model_type: str, arch: str, category: str, out_dir: str) -> dict[str, Any]:
    import warnings

    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sys.path.insert(0, ROOT)
    from hf_oto import GroupConfig, compress, find_groups
    from hf_oto.compress.core import _run, max_relative_difference

    row: dict[str, Any] = {"model_type": model_type, "arch": arch, "category": category}
    if not arch:
        row["error"] = "no model class in the auto mappings"
        return row
    try:
        cls = getattr(transformers, arch)
        problems: list[str] = []
        config = shrink(CONFIG_MAPPING[model_type](), problems)
        if problems:
            row["config_note"] = problems[0]
        torch.manual_seed(0)
        model = cls(config).eval()
        inputs = make_inputs(model, config)
        first = _run(model, inputs)
    except Exception as exc:
        row["error"] = f"cannot build or run a tiny model ({_short(exc)})"
        return row
    if max_relative_difference(first, _run(model, inputs)) != 0.0:
        row["error"] = "outputs differ between two runs in eval mode (random masking or sampling): not checkable"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = find_groups(model, inputs, GroupConfig(prune_experts=True))
    except Exception as exc:
        row["error"] = f"analysis failed ({_short(exc)})"
        return row
    structures = _structures(groups)
    for kind in ("head", "neuron", "channel", "expert"):
        found = [g for g in structures if g.kind == kind]
        done = sum(g.prunable for g in found)
        row[kind] = f"{done}/{len(found)}" if found else "-"
        if done < len(found):
            row[f"{kind}_why"] = _why(found, kind)
    row["unsupported"] = groups.unsupported_ops[:2]
    row["notes"] = groups.notes
    if groups.num_prunable == 0:
        row["exact"] = "nothing to remove"
        return row
    gen = torch.Generator().manual_seed(0)
    prunable = groups.prunable_mask.nonzero().flatten()
    chosen = prunable[torch.randperm(prunable.numel(), generator=gen)[: int(round(0.4 * prunable.numel()))]]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[chosen] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    try:
        reference = _run(model, inputs)
        small = compress(model, groups)
        row["exact"] = f"yes ({max_relative_difference(reference, _run(small, inputs)):.0e})"
    except Exception as exc:
        row["exact"] = f"no: {_short(exc)}"
        return row
    if category in GENERATES and hasattr(small, "generate"):
        try:
            kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
            if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None \
                    and getattr(small.generation_config, "decoder_start_token_id", None) is None:
                kwargs["decoder_start_token_id"] = getattr(config, "pad_token_id", None) or 0
            prompt = {k: v[:1] for k, v in inputs.items() if k != "decoder_input_ids"}
            expected = model.generate(**prompt, **kwargs)
            row["generate"] = "yes" if torch.equal(small.generate(**prompt, **kwargs), expected) else "no: tokens differ"
        except Exception as exc:
            row["generate"] = f"error: {_short(exc)}"
    try:
        path = os.path.join(out_dir, model_type)
        small.save_pretrained(path)
        torch.save({"inputs": inputs, "outputs": _run(small, inputs)}, os.path.join(path, "reference.pt"))
        row["saved"] = path
    except Exception as exc:
        row["reload"] = f"no: save failed ({_short(exc)})"
    return row


def reload_one(path: str) -> dict[str, Any]:
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    import hf_oto
    from hf_oto.compress.core import _run, max_relative_difference

    ref = torch.load(os.path.join(path, "reference.pt"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    # A model whose new sizes a standard config can state is saved without auto_map or remote code
    # (every layer kept the same counts): then its own class must load it.
    if "auto_map" in config:
        auto = next(iter(config["auto_map"]))
        plain = lambda: getattr(transformers, auto).from_pretrained(path, trust_remote_code=True)  # noqa: E731
    else:
        plain = lambda: getattr(transformers, config["architectures"][0]).from_pretrained(path)  # noqa: E731
    worst = 0.0
    for load in (plain, lambda: hf_oto.from_pretrained(path)):
        worst = max(worst, max_relative_difference(ref["outputs"], _run(load(), ref["inputs"])))
    return {"reload": "yes" if worst == 0.0 else f"no: outputs differ by {worst:.1e}"}


# -- workers ------------------------------------------------------------------------------------------

def worker() -> None:
    """Read one JSON job per line, answer one JSON line per job."""
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = reload_one(job["path"]) if job["kind"] == "reload" else run_one(*job["args"])
        except BaseException as exc:  # a crash of one job is its result
            result = {"error": f"unexpected ({_short(exc)})"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Pool:
    """Worker processes answering jobs in order, each job with a time limit."""

    def __init__(self, n: int, timeout: float) -> None:
        self.n, self.timeout = n, timeout
        self.env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=self.env, cwd=ROOT)

    def map(self, jobs: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        busy: dict[subprocess.Popen, tuple[int, float]] = {}
        idle = [self._start() for _ in range(min(self.n, len(jobs)))]
        done = 0
        while todo or busy:
            while idle and todo:
                proc, i = idle.pop(), todo.pop(0)
                proc.stdin.write(json.dumps(jobs[i]) + "\n")
                proc.stdin.flush()
                busy[proc] = (i, time.monotonic())
            ready, _, _ = select.select([p.stdout for p in busy], [], [], 1.0)
            for proc in list(busy):
                i, started = busy[proc]
                if proc.stdout in ready:
                    line = proc.stdout.readline()
                    results[i] = json.loads(line) if line else {"error": "worker crashed"}
                elif time.monotonic() - started > self.timeout:
                    results[i] = {"error": f"timed out after {self.timeout:.0f} s"}
                else:
                    continue
                del busy[proc]
                done += 1
                if progress:
                    print(f"[{done}/{len(jobs)}] {jobs[i].get('args', [jobs[i].get('path')])[0]}", file=sys.stderr)
                if proc.poll() is None and not results[i].get("error", "").startswith(("timed out", "worker")):
                    idle.append(proc)
                else:  # a stuck or dead worker is replaced
                    proc.kill()
                    proc.wait()
                    if todo:
                        idle.append(self._start())
        for proc in idle:
            proc.stdin.close()
            proc.wait()
        return [r or {"error": "no result"} for r in results]


# -- report -----------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _first_reason(row: dict[str, Any]) -> str:
    if row.get("error"):
        return row["error"]
    for key in ("exact", "generate", "reload"):
        if str(row.get(key, "")).startswith(("no", "error", "not checked")):
            return f"{key}: {row[key]}"
    reasons = []
    for kind in ("head", "neuron", "channel", "expert"):
        if row.get(f"{kind}_why"):
            reasons.append(f"{kind}s: {row[f'{kind}_why']}")
    if row.get("unsupported"):
        reasons.append("not understood: " + "; ".join(row["unsupported"]))
    return " / ".join(reasons)


def _ok(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("yes")


def _all_prunable(value: Any) -> bool:
    if not isinstance(value, str) or "/" not in value:
        return False
    done, total = value.split("/")
    return int(total) > 0 and done == total


def report(rows: list[dict[str, Any]], argv: list[str]) -> str:
    import torch
    import transformers

    text_rows = [r for r in rows if r["category"] in ("text encoder", "text decoder", "encoder-decoder")]
    built = [r for r in rows if "error" not in r]
    goal = [r for r in text_rows if _all_prunable(r.get("head")) and _all_prunable(r.get("neuron"))
            and _ok(r.get("exact")) and _ok(r.get("reload"))
            and (r["category"] == "text encoder" or _ok(r.get("generate")))]

    def count(pred) -> int:
        return sum(1 for r in built if pred(r))

    lines = [
        "# Coverage of the Transformers model registry",
        "",
        f"Generated by `python {' '.join(['bench/coverage.py'] + argv)}` (transformers {transformers.__version__}, "
        f"torch {torch.__version__}). One architecture per model type, "
        "built from its default config shrunk to a tiny size; a random 40% of the prunable groups zeroed, "
        "then `compress`, a reload in another process, and greedy `generate()` for decoders. "
        "Counts are prunable / found and leave out the dims the task fixes (the outputs, the "
        "vocabulary). See the docstring of `bench/coverage.py`.",
        "",
        "## Summary",
        "",
        f"- model types in the registry: {len(rows)}; built and run from a tiny config: {len(built)}",
        f"- with prunable heads: {count(lambda r: _prunable_any(r.get('head')))}; prunable neurons: "
        f"{count(lambda r: _prunable_any(r.get('neuron')))}; prunable channels: "
        f"{count(lambda r: _prunable_any(r.get('channel')))}; mixture-of-experts models (whole experts found): "
        f"{count(lambda r: r.get('expert', '-') != '-')}",
        f"- exact after compress: {count(lambda r: _ok(r.get('exact')))} of "
        f"{count(lambda r: r.get('exact', '-') != 'nothing to remove')}; reload exact in a fresh process: "
        f"{count(lambda r: _ok(r.get('reload')))} of {count(lambda r: str(r.get('reload', '')).startswith(('yes', 'no:')))} "
        f"checked; greedy generate() equal: {count(lambda r: _ok(r.get('generate')))} "
        f"of {count(lambda r: r['category'] in GENERATES and r.get('generate'))} decoders",
        f"- text encoders, decoders and encoder-decoders: {len(text_rows)}; with every head and neuron "
        f"prunable and everything exact: {len(goal)}",
        "",
        "Per category (built / run):",
        "",
    ]
    for category, n in sorted(Counter(r["category"] for r in rows).items()):
        ok = sum(1 for r in built if r["category"] == category)
        lines.append(f"- {category}: {ok} / {n}")
    lines += ["", "## Per model type", "",
              "| model type | architecture | category | heads | neurons | channels | experts | exact | reload | generate | why not |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = r.get("exact", "-")
        exact = "yes" if _ok(exact) else ("-" if exact == "-" else "no" if str(exact).startswith("no") else exact)
        lines.append("| " + " | ".join(_cell(x) for x in (
            r["model_type"], r.get("arch", ""), r["category"], r.get("head", "-"), r.get("neuron", "-"),
            r.get("channel", "-"), r.get("expert", "-"), exact,
            "yes" if _ok(r.get("reload")) else ("no" if str(r.get("reload", "")).startswith("no") else "-"),
            "yes" if _ok(r.get("generate")) else ("no" if r.get("generate") else "-"),
            _first_reason(r))) + " |")
    return "\n".join(lines) + "\n"


def _prunable_any(value: Any) -> bool:
    return isinstance(value, str) and "/" in value and int(value.split("/")[0]) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="regular expressions matched against model types")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds per architecture (default 180; the slowest take about 30 s on 2 idle cores)")
    parser.add_argument("--output", help="write the markdown report here (default: print it)")
    parser.add_argument("--json", help="also write the raw results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    start = time.monotonic()
    plan = registry(args.only)
    out_dir = tempfile.mkdtemp(prefix="hf_oto_coverage_")
    try:
        pool = Pool(args.workers, args.timeout)
        rows = pool.map([{"kind": "build", "args": [t, a, c, out_dir]} for t, a, c in plan])
        for (t, a, c), r in zip(plan, rows):
            r.setdefault("model_type", t)
            r.setdefault("arch", a)
            r.setdefault("category", c)
        saved = [r for r in rows if r.get("saved")]
        # Reloads run in processes that never built these models.
        for r, found in zip(saved, Pool(args.workers, args.timeout).map(
                [{"kind": "reload", "path": r["saved"]} for r in saved])):
            r["reload"] = found.get("reload") or f"no: {found.get('error', 'failed')}"
            del r["saved"]
        for r in rows:  # a tiny config its own class rejects cannot be saved: not hf_oto's doing
            if r.get("config_note") and str(r.get("reload", "")).startswith("no"):
                r["reload"] = f"not checked: the tiny config does not validate ({r['config_note']})"
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--only", *args.only] if args.only else []
    text = report(rows, argv)
    print(f"coverage: {len(rows)} model types in {time.monotonic() - start:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
