"""Pictures of a run (training.png, layers.png), their place in the model card, and the same curves
in TensorBoard."""

import glob
import os
import sys

import pytest
import torch
from trainer_utils import classification_data, classifier

from hf_oto import OTOTrainer, OTOTrainingArguments, find_groups
from hf_oto.hub import CompressionReport, build_model_card
from hf_oto.plots import LAYERS_PNG, TRAINING_PNG, plot_layers, plot_training, save_plots, training_curve
from hf_oto.testing.zoo import build
from hf_oto.hub import layer_table

pytest.importorskip("matplotlib")


def _window_patches(ax):
    return [p for p in ax.patches if p.get_gid() == "pruning_window"]


def _line(ax, key):
    lines = [line for line in ax.get_lines() if line.get_gid() == key]
    assert len(lines) == 1, [line.get_gid() for line in ax.get_lines()]
    return list(lines[0].get_xdata()), list(lines[0].get_ydata())


HISTORY = [{"step": s, "loss": 3.0 - 0.05 * s, "group_sparsity": min(max(s - 10, 0), 20) / 40,
            "kept_flops": 1000 - 10 * min(max(s - 10, 0), 20), "kept_params": 500 - 5 * min(max(s - 10, 0), 20)}
           for s in range(2, 42, 2)]


def test_training_plot_shades_the_pruning_window_and_draws_the_logged_values():
    fig = plot_training(HISTORY, pruning_window=(10, 30), target_group_sparsity=0.5, dense_flops=1000,
                        dense_params=500)
    loss_ax, sparsity_ax, kept_ax = fig.axes
    for ax in fig.axes:
        (span,) = _window_patches(ax)
        assert (span.get_x(), span.get_x() + span.get_width()) == (10, 30)
    steps = [e["step"] for e in HISTORY]
    assert _line(loss_ax, "loss") == (steps, [e["loss"] for e in HISTORY])
    assert _line(sparsity_ax, "group_sparsity") == (steps, [e["group_sparsity"] for e in HISTORY])
    assert list(_line(sparsity_ax, "target")[1]) == [0.5, 0.5]
    # kept FLOPs and parameters in % of dense, from the absolute counts
    assert _line(kept_ax, "kept_flops")[1] == pytest.approx([100 * e["kept_flops"] / 1000 for e in HISTORY])
    assert _line(kept_ax, "kept_params")[1] == pytest.approx([100 * e["kept_params"] / 500 for e in HISTORY])
    assert _line(kept_ax, "kept_flops")[1][-1] == pytest.approx(80.0)


def test_training_plot_prefers_logged_ratios_and_says_what_is_missing():
    history = [{"step": 1, "loss": 1.0, "kept_flops_ratio": 0.9}, {"step": 2, "loss": 0.5, "kept_flops_ratio": 0.7}]
    fig = plot_training(history)  # no window: no shading
    assert not any(_window_patches(ax) for ax in fig.axes)
    assert _line(fig.axes[2], "kept_flops")[1] == pytest.approx([90.0, 70.0])
    assert [t.get_text() for t in fig.axes[1].texts] == ["not logged"]  # no group_sparsity in these logs


def test_training_curve_keeps_training_entries_and_curve_keys():
    log = [{"step": 2, "loss": 1.0, "learning_rate": 1e-3, "group_sparsity": 0.0, "phase": 0.0, "epoch": 0.1},
           {"step": 2, "eval_loss": 0.9, "eval_accuracy": 0.5},
           {"step": 4, "train_loss": 0.8, "train_runtime": 3.0}]
    assert training_curve(log) == [{"step": 2, "loss": 1.0, "group_sparsity": 0.0}]


def test_layer_plot_counts_equal_the_groups_counts():
    model, inputs = build("resnet")
    groups = find_groups(model, inputs)
    removed = torch.zeros(len(groups), dtype=torch.bool)
    prunable = torch.nonzero(groups.prunable_mask).flatten()
    removed[prunable[::3]] = True  # every third prunable group
    fig = plot_layers(layer_table(groups, removed))

    expected: dict[str, dict[str, list[int]]] = {}  # kind -> layer -> [kept, removed], from the groups alone
    for g in groups:
        if g.prunable:
            counts = expected.setdefault(g.kind, {}).setdefault(g.layer or "<model>", [0, 0])
            counts[int(bool(removed[g.index]))] += 1
    assert len(fig.axes) == len(expected)
    for ax in fig.axes:
        kind = next(k for k in expected if ax.get_title().startswith({"channel": "channels"}.get(k, k)))
        kept_bars, removed_bars = ax.containers
        names = [t.get_text() for t in ax.get_yticklabels()]
        drawn = {name: [k.get_width(), r.get_width()] for name, k, r in zip(names, kept_bars, removed_bars)}
        assert drawn == expected[kind]
        total_kept = sum(k for k, _ in expected[kind].values())
        assert f"{total_kept} kept" in ax.get_title()


def test_layer_plot_keeps_kinds_apart_and_refuses_an_empty_table():
    rows = [{"layer": "l0", "kind": "head", "total": 12, "removed": 6},
            {"layer": "l0", "kind": "neuron", "total": 1536, "removed": 700},
            {"layer": "", "kind": "hidden", "total": 384, "removed": 0}]  # unpruned hidden width: not drawn
    fig = plot_layers(rows)
    assert [ax.get_title() for ax in fig.axes] == ["attention heads: 6 kept, 6 removed",
                                                   "FFN neurons: 836 kept, 700 removed"]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_layers(rows[2:])


def _report(**kw) -> CompressionReport:
    return CompressionReport(model_class="BertForSequenceClassification", method="hesso", params_before=500,
                             params_after=400, flops_before=1000, flops_after=800, training_log=HISTORY,
                             pruning_window=[10, 30], settings={"target_group_sparsity": 0.5},
                             layers=[{"layer": "l0", "kind": "head", "total": 4, "removed": 2}], **kw)


def test_card_embeds_the_pictures_with_relative_links(tmp_path):
    report = _report()
    written = save_plots(tmp_path, report)
    assert written == [TRAINING_PNG, LAYERS_PNG]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    card = str(build_model_card(report, "me/model", written))
    assert f"]({TRAINING_PNG})" in card and f"]({LAYERS_PNG})" in card
    assert card.index(f"]({LAYERS_PNG})") > card.index("## What was removed")
    assert "](training.png)" not in str(build_model_card(report, "me/model"))  # nothing written, nothing linked


def test_without_matplotlib_nothing_is_drawn_and_it_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with caplog.at_level("INFO", logger="hf_oto.plots"):
        assert save_plots(tmp_path, _report()) == []
    assert "matplotlib is not installed" in caplog.text
    assert os.listdir(tmp_path) == []


def test_trainer_writes_pictures_and_tensorboard_gets_the_same_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = OTOTrainingArguments(
        output_dir=str(tmp_path / "out"), oto_method="hesso", target_group_sparsity=0.5, max_steps=12,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, logging_steps=2, learning_rate=3e-3,
        oto_pruning_start=2, oto_pruning_end=8, oto_pruning_periods=3, report_to=["tensorboard"],
        save_strategy="no", use_cpu=True, seed=0, oto_measure_latency=False)
    trainer = OTOTrainer(model=classifier(), args=args, train_dataset=classification_data(),
                         eval_dataset=classification_data(32, seed=1))
    trainer.train()
    folder = trainer.save_compressed()

    report = trainer.oto_report
    assert report.pruning_window == [2, 8]
    assert [e["step"] for e in report.training_log] == [2, 4, 6, 8, 10, 12]
    assert report.training_log[-1]["group_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert {TRAINING_PNG, LAYERS_PNG} <= set(os.listdir(folder))
    card = open(os.path.join(folder, "README.md")).read()
    assert f"]({TRAINING_PNG})" in card and f"]({LAYERS_PNG})" in card

    # Transformers' TensorBoard callback writes under output_dir/runs/<date>_<host>/, a new event file
    # each time its writer reopens (the evaluations after training); the accumulator reads them all.
    (run_dir,) = glob.glob(str(tmp_path / "out" / "runs" / "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    assert {"train/loss", "train/group_sparsity", "train/kept_flops", "train/kept_params"} <= set(
        events.Tags()["scalars"])
    for key in ("group_sparsity", "kept_flops", "loss"):
        logged = [(e["step"], e[key]) for e in report.training_log]
        in_tensorboard = [(s.step, s.value) for s in events.Scalars(f"train/{key}")]
        assert [s for s, _ in in_tensorboard] == [s for s, _ in logged]
        assert [v for _, v in in_tensorboard] == pytest.approx([v for _, v in logged], rel=1e-6)
