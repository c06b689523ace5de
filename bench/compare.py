"""hf_oto against what a user would otherwise do, at equal training budget, on tasks that tell
methods apart. Writes one table (docs/compare.md) and one plot (docs/compare.png).

Rows (``bench/methods``): hf_oto's HESSO and DHSPG, each with the old and the new group-selection
criterion, and HSPG; prune-then-finetune and gradual magnitude pruning of the same groups;
Torch-Pruning with its Taylor and magnitude importance; the authors' only-train-once HESSO. Every
row of a task gets the same model, data, number of optimizer steps and learning-rate schedule
(``bench/methods/loop.py``) and ends at the same kept-FLOPs target; FLOPs are counted with
``hf_oto.measure.count_flops`` on each final physical model and CPU latency is measured for each
against the dense model in the same measurement.

Tasks (``bench/tasks``): ``qa-hard`` (MiniLM fine-tuned on the hard synthetic QA set),
``embed-distill`` (MiniLM compressed while keeping its sentence embeddings, real English text),
``digits-resnet`` and ``digits-convnext`` (from scratch on scikit-learn's real digit images).

    python bench/compare.py                      # the full run (prints its estimated time first)
    python bench/compare.py --quick              # one seed, the 0.5 point, half the steps
    python bench/compare.py --estimate           # only print the estimated time
    python bench/compare.py --tasks digits-resnet --seeds 0 --points 0.5 --rows HESSO Torch
    # paper scale (network and a GPU-sized budget): BERT-base on SQuAD
    python bench/compare.py --tasks qa --model_name_or_path bert-base-uncased --dataset_name squad \\
        --max_seq_length 384 --doc_stride 128 --steps 3000 --batch_size 32 --learning_rate 3e-5

Results are appended to ``--results`` (JSON) run by run; ``--resume`` skips runs already there.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.compare_report import aggregate, order_rows, plot, task_table  # noqa: E402
from bench.methods import NEW_SALIENCY, OLD_SALIENCY, HfOto, all_rows  # noqa: E402
from bench.methods.hf_oto_rows import accepts  # noqa: E402
from bench.methods.loop import dense_reference, run  # noqa: E402
from bench.tasks import TASKS, make_task  # noqa: E402
from bench.tasks.base import to_device  # noqa: E402
from hf_oto.optim.selection import DEFAULT_PRUNING_SCHEDULE, DEFAULT_SALIENCY, PRUNING_SCHEDULES  # noqa: E402

DEFAULT_TASKS = ("qa-hard", "embed-distill", "digits-resnet", "digits-convnext")
DEFAULT_POINTS = (0.7, 0.5, 0.35)
#: Seeds of the full run: three where a run takes seconds, one where it takes minutes (2 CPU cores).
DEFAULT_SEEDS = {"qa-hard": (0,), "embed-distill": (0,), "digits-resnet": (0, 1, 2), "digits-convnext": (0, 1, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"from {', '.join(TASKS)} (qa: see below)")
    p.add_argument("--points", type=float, nargs="+", default=list(DEFAULT_POINTS), help="kept-FLOPs targets")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 3 for digits, 1 for the text tasks")
    p.add_argument("--rows", nargs="+", default=None, help="run only rows whose name contains one of these")
    p.add_argument("--criteria", nargs="+", default=[OLD_SALIENCY, NEW_SALIENCY],
                   help="group-selection criteria of the hf_oto HESSO/DHSPG rows (oto_saliency names)")
    p.add_argument("--schedules", nargs="+", default=list(PRUNING_SCHEDULES), choices=list(PRUNING_SCHEDULES),
                   help="pruning schedules: each other than linear adds a HESSO row with the default criterion")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: each task's own)")
    p.add_argument("--pruning_periods", type=int, default=None, help="pruning periods (default 10)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="one seed, the 0.5 point and half the steps")
    p.add_argument("--estimate", action="store_true", help="print the estimated time of the run and stop")
    p.add_argument("--results", default=os.path.join("out", "compare", "results.json"))
    p.add_argument("--resume", action="store_true", help="skip runs already in --results")
    p.add_argument("--report_only", nargs="+", default=None, metavar="RESULTS",
                   help="write the table and plot from these results files (of one or several runs), run nothing")
    p.add_argument("--table", default=os.path.join(ROOT, "docs", "compare.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "compare.png"))
    p.add_argument("--no_progress", action="store_true", help="no progress bars (logs, tests)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the bench machine has 2 cores)")
    p.add_argument("--device", default="cpu",
                   help="where the runs train (cuda: a GPU; CPU latency is then not measured)")
    qa = p.add_argument_group("the qa task (paper scale: --model_name_or_path bert-base-uncased --dataset_name squad)")
    qa.add_argument("--model_name_or_path", default="minilm")
    qa.add_argument("--dataset_name", default=None, help="a Hub dataset or a local folder in the Hub layout")
    qa.add_argument("--dataset_config_name", default=None)
    qa.add_argument("--max_seq_length", type=int, default=128)
    qa.add_argument("--doc_stride", type=int, default=48)
    qa.add_argument("--max_train_samples", type=int, default=None)
    qa.add_argument("--max_eval_samples", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.points = [0.5] if args.points == list(DEFAULT_POINTS) else args.points
        args.seeds = args.seeds or [0]
    for point in args.points:
        if not 0.0 < point < 1.0:
            p.error(f"--points must be in (0, 1), got {point}")
    if args.device != "cpu" and not args.report_only:
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as err:  # no such device, or torch built without it
            p.error(f"--device {args.device} is not usable here: {str(err).splitlines()[0]}")
    return args


def build_tasks(args: argparse.Namespace) -> list:
    tasks = []
    for name in args.tasks:
        options = {}
        if name in ("qa", "qa-hard"):
            options = dict(model=args.model_name_or_path, dataset_name=args.dataset_name,
                           dataset_config_name=args.dataset_config_name, max_seq_length=args.max_seq_length,
                           doc_stride=args.doc_stride, max_train_samples=args.max_train_samples,
                           max_eval_samples=args.max_eval_samples)
            name = "qa-hard"
        task = make_task(name, **options)
        budget = task.budget
        steps = args.steps or (budget.steps // 2 if args.quick else budget.steps)
        changes = {"steps": steps, "pruning_periods": args.pruning_periods, "batch_size": args.batch_size,
                   "learning_rate": args.learning_rate}
        task.budget = type(budget)(**{**budget.__dict__, **{k: v for k, v in changes.items() if v is not None}})
        task.budget.window()  # fails now, with a clear message, if the steps cannot hold the periods
        tasks.append(task)
    return tasks


def seeds_of(task, args) -> list[int]:
    return list(args.seeds) if args.seeds else list(DEFAULT_SEEDS.get(task.name, (0,)))


def selected_rows(args):
    rows = all_rows(tuple(args.criteria), tuple(args.schedules))
    if args.rows:
        rows = [r for r in rows if any(s.lower() in r.name.lower() for s in args.rows)]
    return rows


def estimate_seconds(task, runs_per_seed: int, seeds: int, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Time a few training steps and one evaluation of the dense model, scale to the run count."""
    import copy

    from bench.methods.loop import seed_everything

    seed_everything(0)
    model = task.dense_reference(0)
    model = (copy.deepcopy(model) if model is not None else task.build_model(0)).train().to(device)
    batches = (to_device(batch, device) for batch in task.train_batches(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        task.loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if device != "cpu":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    step = min(timings[1:])
    start = time.perf_counter()
    task.evaluate(model)
    evaluation = time.perf_counter() - start
    # Per run: the steps (+15% for the methods' own work), evaluation, analysis/pruner set-up and
    # latency measurement (about three evaluations' worth).
    per_run = task.budget.steps * step * 1.15 + 4 * evaluation + 3.0
    dense = 0.0 if task.dense_reference(0) is not None else per_run
    return seeds * (runs_per_seed * per_run + dense), {"step_s": step, "eval_s": evaluation, "run_s": per_run}


def device_name() -> str:
    """Where the runs of this process trained (kept with the results)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


@functools.cache  # read once, when the runs start: the checkout may move on while they run
def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def task_info(task) -> dict:
    """What the report says about a task (kept with the results, so a report needs no task object)."""
    budget = task.budget
    return {"description": task.description, "metric": task.metric, "metrics": list(task.metrics),
            "budget": dict(budget.__dict__), "window": list(budget.window())}


def load_results(paths: list[str]) -> tuple[list[dict], dict[str, dict]]:
    runs, tasks = [], {}
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            runs += saved["runs"]
            tasks.update(saved.get("tasks", {}))
    return runs, tasks


def save_results(path: str, runs: list[dict], tasks: dict[str, dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"command": " ".join(sys.argv), "code": code_version(), "device": device_name(), "tasks": tasks,
                   "runs": runs}, f, indent=1)
    os.replace(tmp, path)


def _key(r: dict) -> tuple:
    return r["task"], r["method"], r["seed"], r["target_kept_flops"], r["steps"]


def write_report(tasks: dict[str, dict], runs: list[dict], method_order: list[str], args, elapsed: float) -> str:
    aggregated = aggregate(runs)
    api = ("saliency= and target_kept_flops= present in the optimizer factory"
           if accepts("hesso", "saliency") and accepts("hesso", "target_kept_flops") else
           "saliency= / target_kept_flops= not in the optimizer factory of this code: hf_oto rows use their "
           "built-in criterion and a group sparsity calibrated to the FLOPs target; rows of the new criterion "
           "are marked not run")
    default_row = HfOto("hesso", saliency=DEFAULT_SALIENCY, pruning_schedule=DEFAULT_PRUNING_SCHEDULE).name
    lines = ["# hf_oto against the alternatives, at equal training budget", "",
             f"Generated by `python bench/compare.py {' '.join(sys.argv[1:])}` on "
             f"{datetime.date.today().isoformat()}, code {code_version()}, {platform.machine()} CPU, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {elapsed / 60:.1f} min of runs. "
             f"Timings come from a machine shared with other jobs: read latencies as ratios measured "
             f"against the dense model in the same measurement, not as absolute numbers.", "",
             f"Status of the selection API: {api}.", "",
             f"hf_oto's defaults are the row `{default_row}`; the untagged HESSO and DHSPG rows run the "
             "published `linear` schedule.", "",
             "![quality against kept FLOPs and CPU latency](compare.png)", ""]
    for name, info in tasks.items():
        mine = order_rows([r for r in aggregated if r["task"] == name], method_order)
        b = info["budget"]
        start, end = info["window"]
        lines += [f"## {name}", "", info["description"] + ".", "",
                  f"Budget for every row: {b['steps']} optimizer steps of batch {b['batch_size']}, AdamW-style base "
                  f"step, peak learning rate {b['learning_rate']:g} (linear warm-up over {b['warmup']:.0%}, then "
                  f"linear decay), weight decay {b['weight_decay']:g}, gradient clipping {b['max_grad_norm']:g}; "
                  f"pruning window steps {start}-{end} in {b['pruning_periods']} periods. Quality: "
                  f"{', '.join(info['metrics'])} (mean ± standard deviation over seeds).", "",
                  task_table(mine, tuple(info["metrics"])), ""]
    if args.plot:
        plot(aggregated, [(name, info["metric"]) for name, info in tasks.items()], args.plot)
    text = "\n".join(lines)
    if args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        with open(args.table, "w") as f:
            f.write(text)
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.report_only:
        runs, infos = load_results(args.report_only)
        if not runs:
            raise FileNotFoundError(f"no runs in {args.report_only}")
        for name in dict.fromkeys(r["task"] for r in runs):
            if name not in infos:  # results written before task descriptions were kept with them
                infos[name] = task_info(build_tasks(argparse.Namespace(**{**vars(args), "tasks": [name]}))[0])
        order = [r.name for r in selected_rows(args)]
        print(write_report(infos, runs, order, args, sum(r["seconds"] for r in runs)))
        return runs
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    code_version()
    tasks = build_tasks(args)
    rows = selected_rows(args)
    runnable = [r for r in rows if r.available() is None]
    total = 0.0
    print(f"{len(rows)} rows ({len(rows) - len(runnable)} cannot run with this code: counted in the estimate "
          f"all the same), points {args.points}")
    for task in tasks:
        seconds, detail = estimate_seconds(task, len(rows) * len(args.points), len(seeds_of(task, args)), args.device)
        total += seconds
        print(f"  {task.name:<16} {task.budget.steps} steps, {len(seeds_of(task, args))} seed(s): "
              f"{detail['step_s'] * 1e3:.0f} ms/step, {detail['run_s']:.0f} s/run -> {seconds / 60:.0f} min")
    print(f"estimated time: {total / 60:.0f} min on this machine ({os.cpu_count()} cores, {args.threads} threads; "
          "more if other jobs share it)")
    if args.estimate:
        return []

    runs, infos = load_results([args.results]) if args.resume else ([], {})
    cpu_latency = args.device == "cpu"
    infos.update({task.name: task_info(task) for task in tasks})
    done = {_key(r) for r in runs}
    for task in tasks:
        for seed in seeds_of(task, args):
            dense_model, dense_row = dense_reference(task, seed, show_progress=not args.no_progress,
                                                     device=args.device, cpu_latency=cpu_latency)
            if _key(dense_row.to_dict()) not in done:
                runs.append(dense_row.to_dict())
                print(f"{task.name} seed {seed} dense: {dense_row.metrics}")
            for point in args.points:
                for method in rows:
                    key = (task.name, method.name, seed, point, task.budget.steps)
                    if key in done:
                        continue
                    result = run(task, method, seed, point, dense_model, show_progress=not args.no_progress,
                                 device=args.device, cpu_latency=cpu_latency)
                    runs.append(result.to_dict())
                    save_results(args.results, runs, infos)
                    summary = result.error or (f"{task.metric} {result.metrics[task.metric]:.3f}, kept FLOPs "
                                               f"{result.kept_flops:.3f}, {result.seconds:.0f} s")
                    print(f"{task.name} seed {seed} {point:.2f} {method.name}: {summary}")
    save_results(args.results, runs, infos)
    elapsed = time.perf_counter() - started
    table = write_report({t.name: infos[t.name] for t in tasks}, runs, [r.name for r in rows], args, elapsed)
    print(table)
    print(f"\ntotal time {elapsed / 60:.1f} min; table {args.table}, plot {args.plot}, runs {args.results}")
    return runs


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        sys.exit(f"compare.py: error: {err}")
