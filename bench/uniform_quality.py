"""What layer-uniform selection costs in quality at equal FLOPs.

A small LLaMA-shaped byte-level language model is trained on English prose shipped with Python
(``pydoc_data.topics``), once dense and then with HESSO to a kept-FLOPs target, with and without
``uniform_layers``: same model, data, steps, schedule and seeds for every row. The held-out loss of
the compressed models (and their kept FLOPs) is printed per seed and as a mean.

    python bench/uniform_quality.py                 # 3 seeds, 400 steps
    python bench/uniform_quality.py --seeds 1 --steps 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.measure import count_flops  # noqa: E402
from hf_oto.optim import create_oto_optimizer  # noqa: E402

SEQ, BATCH = 64, 16


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the pydoc topics: the first 90% to train on, the rest held out."""
    import pydoc_data.topics as topics

    data = torch.tensor(list("\n".join(topics.topics[k] for k in sorted(topics.topics)).encode()), dtype=torch.long)
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


def model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=384, max_position_embeddings=SEQ, use_cache=False)
    return LlamaForCausalLM(cfg)


def batch(data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen)
    return torch.stack([data[s:s + SEQ] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(net: torch.nn.Module, data: torch.Tensor) -> float:
    net.eval()
    windows = data[: (data.numel() // SEQ) * SEQ].view(-1, SEQ)[:256]
    losses = [float(net(input_ids=w, labels=w).loss) for w in windows.split(32)]
    return statistics.mean(losses)


def run(seed: int, steps: int, uniform: bool | None, target: float, train: torch.Tensor, test: torch.Tensor):
    """Train one model; ``uniform`` None: dense AdamW. Returns (held-out loss, kept FLOPs share)."""
    net = model(seed)
    example = {"input_ids": train[:SEQ].view(1, -1)}
    if uniform is None:
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        groups = None
    else:
        groups = find_groups(net, example)
        opt = create_oto_optimizer(net, groups, method="hesso", lr=3e-3, target_kept_flops=target,
                                   uniform_layers=uniform, start_pruning_step=steps // 8,
                                   pruning_steps=steps // 2, pruning_periods=5)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        ids = batch(train, gen)
        loss = net(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    dense_flops = count_flops(net, example)
    if groups is not None:
        net = compress(net, groups)
    return held_out_loss(net, test), count_flops(net, example) / dense_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.5, help="kept share of the FLOPs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    train, test = corpus()
    rows = {"dense": None, "hesso, non-uniform": False, "hesso, uniform_layers": True}
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    start = time.time()
    for seed in range(args.seeds):
        for name, uniform in rows.items():
            found[name].append(run(seed, args.steps, uniform, args.target, train, test))
    print(f"# bench/uniform_quality.py: byte-level LLaMA (hidden 128, 4 layers, 8 heads / 4 KV, FFN 384) on "
          f"pydoc topics, {args.steps} steps, batch {BATCH} x {SEQ}, target_kept_flops={args.target}, "
          f"{args.seeds} seeds, {time.time() - start:.0f} s\n")
    print("| model | kept FLOPs | held-out loss per seed | mean loss |")
    print("| --- | ---: | --- | ---: |")
    for name, results in found.items():
        losses = [loss for loss, _ in results]
        print(f"| {name} | {statistics.mean(k for _, k in results):.3f} | "
              f"{', '.join(f'{v:.4f}' for v in losses)} | {statistics.mean(losses):.4f} |")


if __name__ == "__main__":
    main()
