"""Latency and throughput of dense vs compressed models: uniform or not, aligned to 8/64 or not.

One LLaMA-shaped decoder (GQA) is compressed by hf_oto in six ways that keep about the same
FLOPs: every layer the same sizes (uniform) or layers of different sizes with the same totals
(non-uniform), FFN widths multiples of 64, of 8, or neither (head counts are multiples of 4).
Each model is timed at batch 1 (latency) and batch 32 (throughput): rounds interleaved in a new
order each round, CPU time of the process rather than wall time on CPU, fastest run counted. The
table reports speed-ups against dense and the ratio of the measured speed-up to the FLOPs
reduction (1.0: the time fell as much as the FLOPs).

    python bench/speed.py                   # CPU, float32
    python bench/speed.py --rounds 5 --gpu  # also bf16 on a GPU when one is present

Goals (issue 15): at batch 32 on CPU the speed-up is at least 0.8x the FLOPs ratio; a non-uniform
model costs at most 5% latency against the uniform one at equal FLOPs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_oto import compress, find_groups  # noqa: E402
from hf_oto.measure import count_flops  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, SEQ, VOCAB = 512, 4, 16, 4, 2048, 128, 1000

#: Kept (KV head groups, FFN neurons) per layer; each KV group is 4 query heads + 1 KV head.
#: Uniform and non-uniform rows keep the same totals, so the same FLOPs.
VARIANTS: dict[str, list[tuple[int, int]]] = {
    "uniform, aligned 64": [(2, 1024)] * LAYERS,
    "uniform, aligned 8": [(2, 1016)] * LAYERS,
    "uniform, unaligned": [(2, 1021)] * LAYERS,
    "non-uniform, aligned 64": [(1, 768), (3, 1280), (2, 896), (2, 1152)],
    "non-uniform, aligned 8": [(1, 760), (3, 1280), (2, 888), (2, 1136)],
    "non-uniform, unaligned": [(1, 765), (3, 1283), (2, 893), (2, 1143)],
}


def dense_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=SEQ,
                      use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def inputs(batch: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids}


def compressed(dense: torch.nn.Module, groups, kept: list[tuple[int, int]]) -> torch.nn.Module:
    """Zero every group beyond the kept counts of each layer in a copy of ``dense``, then compress."""
    import copy

    model = copy.deepcopy(dense)
    remove = torch.zeros(len(groups), dtype=torch.bool)
    seen: dict[tuple[str, str], int] = {}
    want = {}
    for layer, (heads, neurons) in enumerate(kept):
        want[(f"model.layers.{layer}.self_attn.q_proj", "head")] = heads
        want[(f"model.layers.{layer}.mlp.gate_proj", "neuron")] = neurons
    for g, module in zip(groups, groups.producing_layers()):
        key = (module, g.kind)
        if g.prunable and key in want:
            seen[key] = seen.get(key, 0) + 1
            remove[g.index] = seen[key] > want[key]
    with torch.no_grad():
        groups.zero_(groups.parameters(model), remove)
    return compress(model, groups)


def time_once(model: torch.nn.Module, batch: dict[str, torch.Tensor], sync, clock) -> float:
    start = clock()
    with torch.inference_mode():
        model(**batch)
    sync()
    return clock() - start


def measure(models: dict[str, torch.nn.Module], batches: dict[int, dict], rounds: int, repeats: dict[int, int],
            sync=lambda: None, clock=time.process_time) -> dict[tuple[str, int], float]:
    """Fastest seconds per forward, rounds interleaved over the models in a new order each round.

    On CPU the clock is the process's CPU time (``time.process_time``): on a shared machine it
    leaves out the time the scheduler gives to other processes, which wall time would count
    (with one thread, the CPU time of a forward is its latency on an idle core). Other processes
    still only ever add time (caches, memory bandwidth), so the minimum is the least noisy
    estimate, as ``timeit`` advises. The GPU is timed by wall clock after a synchronize."""
    times: dict[tuple[str, int], list[float]] = {}
    for model in models.values():  # warm-up
        for batch in batches.values():
            time_once(model, batch, sync, clock)
    order = list(models)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        # A new order every round: a quiet or busy stretch of the machine favours no fixed row.
        order = [order[i] for i in torch.randperm(len(order), generator=shuffle).tolist()]
        for name in order:
            model = models[name]
            for size, batch in batches.items():
                for _ in range(repeats[size]):
                    times.setdefault((name, size), []).append(time_once(model, batch, sync, clock))
    return {k: min(v) for k, v in times.items()}


def table(title: str, models: dict[str, torch.nn.Module], flops: dict[str, int],
          median: dict[tuple[str, int], float], sizes: list[int]) -> list[str]:
    lines = [title, "",
             "| model | kept FLOPs | " + " | ".join(f"b{s} ms | b{s} speed-up | b{s} speed-up / FLOPs ratio"
                                                    for s in sizes) + " |",
             "| --- | ---: |" + " ---: | ---: | ---: |" * len(sizes)]
    for name in models:
        ratio = flops["dense"] / flops[name]
        cells = []
        for s in sizes:
            speedup = median[("dense", s)] / median[(name, s)]
            cells += [f"{median[(name, s)] * 1000:.1f}", f"{speedup:.2f}x", f"{speedup / ratio:.2f}"]
        lines.append(f"| {name} | {flops[name] / flops['dense']:.3f} | " + " | ".join(cells) + " |")
    return lines


def goals(median: dict[tuple[str, int], float], flops: dict[str, int], big: int) -> list[str]:
    out = [""]
    for name in VARIANTS:
        ratio = flops["dense"] / flops[name]
        speedup = median[("dense", big)] / median[(name, big)]
        out.append(f"- batch {big}, {name}: speed-up {speedup:.2f}x for a FLOPs ratio {ratio:.2f}x = "
                   f"{speedup / ratio:.2f} of it: goal >= 0.8 {'met' if speedup / ratio >= 0.8 else 'NOT met'}")
    for aligned in ("aligned 64", "aligned 8", "unaligned"):
        for size in sorted({s for _, s in median}):
            cost = median[(f"non-uniform, {aligned}", size)] / median[(f"uniform, {aligned}", size)] - 1
            out.append(f"- batch {size}, {aligned}: non-uniform vs uniform latency {cost:+.1%}: goal <= +5% "
                       f"{'met' if cost <= 0.05 else 'NOT met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="batch-32 forwards per model and round on CPU")
    parser.add_argument("--gpu", action="store_true", help="also time bf16 on the GPU when one is present")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dense = dense_model()
    example = inputs(2)
    groups = find_groups(dense, example)
    models = {"dense": dense}
    for name, kept in VARIANTS.items():
        models[name] = compressed(dense, groups, kept).eval()
    flops = {name: count_flops(m, example) for name, m in models.items()}
    batches = {1: inputs(1), 32: inputs(32)}
    print(f"# bench/speed.py: LLaMA-shaped decoder, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads / {KV_HEADS} KV "
          f"heads, FFN {FFN}, sequence {SEQ}")
    print(f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    median = measure(models, batches, args.rounds, {1: 10, 32: args.repeats})
    print("\n".join(table("## CPU, float32", models, flops, median, [1, 32])))
    print("\n".join(goals(median, flops, 32)))
    if args.gpu and torch.cuda.is_available():
        gpu = {k: m.to("cuda", torch.bfloat16) for k, m in models.items()}
        cuda = {s: {k: v.cuda() for k, v in b.items()} for s, b in batches.items()}
        median = measure(gpu, cuda, args.rounds, {1: 20, 32: 10}, sync=torch.cuda.synchronize, clock=time.perf_counter)
        print()
        print("\n".join(table(f"## GPU {torch.cuda.get_device_name()}, bfloat16", gpu, flops, median, [1, 32])))
        print("\n".join(goals(median, flops, 32)))


if __name__ == "__main__":
    main()
