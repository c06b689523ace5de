"""Layer-uniform compressed models saved with standard configs, and lean remote-code folders."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import hf_oto
from hf_oto import compress, find_groups
from hf_oto.compress.modeling_hf_oto import MANIFEST_KEY, auto_classes_for
from hf_oto.compress.standard import standard_config
from hf_oto.hub import CompressionReport, build_model_card
from hf_oto.optim.selection import GroupSelector, SelectionConfig
from hf_oto.testing.zoo import build

from helpers import outputs, reload_in_fresh_process, save_reference, zero_random_groups


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2ForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                        sliding_window=None, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MistralForCausalLM(cfg)


def _family(name):
    if name in ("qwen2", "mistral"):
        torch.manual_seed(0)
        model = _qwen2() if name == "qwen2" else _mistral()
        _, inputs = build("llama-gqa")
        return model.eval(), inputs
    model, inputs = build(name)
    return model.eval(), inputs


def _zero_uniformly(model, groups, kinds, fraction=0.4, seed=0):
    """Zero ``fraction`` of the prunable groups of ``kinds``, the same count in every layer of a family."""
    selector = GroupSelector(groups, SelectionConfig(uniform_layers=True))
    importance = torch.rand(len(groups), generator=torch.Generator().manual_seed(seed)).double()
    candidates = groups.prunable_mask & torch.tensor([g.kind in kinds for g in groups])
    none = torch.zeros(len(groups), dtype=torch.bool)
    chosen = selector.choose(int(fraction * int(candidates.sum())), importance, torch.zeros(len(groups)),
                             candidates, none)
    assert chosen.any()
    with torch.no_grad():
        groups.zero_(groups.parameters(model), chosen)
    return chosen


# hf_oto is made unimportable first: the folder must load with nothing but Transformers.
_PLAIN_LOAD = '''
import sys
sys.modules["hf_oto"] = None
import json, torch, transformers
found = {}
for path, auto in zip(sys.argv[1::2], sys.argv[2::2]):
    ref = torch.load(path + "/reference.pt")
    torch.set_num_threads(ref["threads"])
    model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=False).eval()
    with torch.no_grad():
        out = model(**ref["inputs"])
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    found[path] = {"module": type(model).__module__, "equal": bool(torch.equal(first, ref["outputs"][0])),
                   "worst": float((first - ref["outputs"][0]).abs().max())}
print(json.dumps(found))
'''


def _load_plainly(cases, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    args = [str(a) for path, auto in cases for a in (path, auto)]
    result = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# (zoo name, kinds zeroed): every family of the issue, heads and FFN neurons where the config can say it.
_STANDARD = [("llama-gqa", ("head", "neuron")), ("qwen2", ("head", "neuron")), ("mistral", ("head", "neuron")),
             ("vit", ("head", "neuron")), ("bert-qa", ("neuron",)), ("gpt2", ("neuron",))]


def test_uniform_models_load_exactly_in_plain_transformers_without_hf_oto(tmp_path):
    cases = []
    for name, kinds in _STANDARD:
        model, inputs = _family(name)
        groups = find_groups(model, inputs)
        _zero_uniformly(model, groups, kinds)
        small = compress(model, groups)
        assert outputs(small, inputs)[0].shape == outputs(model, inputs)[0].shape
        path = tmp_path / name
        assert hf_oto.save_pretrained(small, path) == ""
        config = json.load(open(path / "config.json"))
        assert MANIFEST_KEY not in config and "auto_map" not in config, name
        assert config["architectures"] == [type(model).__name__]
        assert not [f for f in os.listdir(path) if f.endswith(".py")], name
        # The sizes really changed in the config (not a dense model).
        dense = model.config.to_dict()
        changed = {k for k in ("intermediate_size", "n_inner", "num_attention_heads", "num_key_value_heads")
                   if k in config and config[k] != dense.get(k)}
        assert changed, name
        if "head" in kinds:
            assert config["num_attention_heads"] < dense["num_attention_heads"]
        if name in ("llama-gqa", "qwen2", "mistral"):  # GQA: the same query heads per KV head
            assert (config["num_attention_heads"] // config["num_key_value_heads"]
                    == dense["num_attention_heads"] // dense["num_key_value_heads"])
        save_reference(small, inputs, path)
        assert type(hf_oto.from_pretrained(path)) is type(model)   # hf_oto loads it as the base class too
        cases.append((path, auto_classes_for(type(model).__name__)[0]))
    found = _load_plainly(cases, tmp_path)
    for path, _ in cases:
        assert found[str(path)]["module"].startswith("transformers.models"), found[str(path)]
        assert found[str(path)]["equal"], (path, found[str(path)])


@pytest.mark.parametrize("name", ["bert-qa", "gpt2"])
def test_a_config_that_cannot_state_the_head_size_falls_back_to_the_manifest_and_says_why(name, tmp_path, caplog):
    model, inputs = _family(name)
    groups = find_groups(model, inputs)
    _zero_uniformly(model, groups, ("head", "neuron"))
    small = compress(model, groups)
    config, why = standard_config(small)
    assert config is None and "derives the head size" in why
    with caplog.at_level(logging.WARNING, logger="hf_oto"):
        assert hf_oto.save_pretrained(small, tmp_path / name) == why
    assert why in caplog.text
    saved = json.load(open(tmp_path / name / "config.json"))
    assert MANIFEST_KEY in saved and "auto_map" in saved
    save_reference(small, inputs, tmp_path / name)
    assert reload_in_fresh_process([tmp_path / name], tmp_path)[str(tmp_path / name)]["worst"] == 0.0
    report = CompressionReport(model_class=type(model).__name__, method="hesso", standard_config=False,
                               standard_config_reason=why)
    card = str(build_model_card(report, "me/model"))
    assert f"Why not a standard config: {why}" in card and "trust_remote_code=True" in card
    assert "torch.export.export" in card and "dynamo=True" in card


def test_uneven_layers_keep_the_manifest_and_the_card_of_a_standard_model_needs_no_remote_code(tmp_path):
    model, inputs = _family("llama-gqa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4, seed=1)  # 52 and 64 neurons kept
    small = compress(model, groups)
    config, why = standard_config(small)
    assert config is None and why.startswith("layers differ in size")
    assert hf_oto.save_pretrained(small, tmp_path / "uneven", standard=True) == why
    report = CompressionReport(model_class="LlamaForCausalLM", method="hesso", standard_config=True)
    card = str(build_model_card(report, "me/model"))
    assert 'AutoModelForCausalLM.from_pretrained("me/model")' in card and "trust_remote_code" not in card


def test_standard_false_keeps_the_manifest(tmp_path):
    model, inputs = _family("llama-gqa")
    groups = find_groups(model, inputs)
    _zero_uniformly(model, groups, ("neuron",))
    small = compress(model, groups)
    assert hf_oto.save_pretrained(small, tmp_path / "m", standard=False) == "standard=False was asked for"
    assert MANIFEST_KEY in json.load(open(tmp_path / "m" / "config.json"))
    # model.save_pretrained itself also saves the standard form (hf_oto installed).
    small.save_pretrained(tmp_path / "s")
    assert MANIFEST_KEY not in json.load(open(tmp_path / "s" / "config.json"))
    assert type(small).__name__ == "HfOtoLlamaForCausalLM"  # the in-memory model is unchanged


def test_folders_hold_only_the_remote_code_their_layers_need(tmp_path):
    from hf_oto.methods.opq import quantize

    model, inputs = _family("bert-qa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4, seed=1)
    pruned = compress(model, groups)
    quantized = quantize(pruned, target_rate=8.0).eval()
    hf_oto.save_pretrained(pruned, tmp_path / "pruned")
    hf_oto.save_pretrained(quantized, tmp_path / "quantized")
    py = {k: sorted(f for f in os.listdir(tmp_path / k) if f.endswith(".py")) for k in ("pruned", "quantized")}
    assert py["pruned"] == ["hf_oto_layers.py", "modeling_hf_oto.py"]
    assert py["quantized"] == ["hf_oto_layers.py", "hf_oto_layers_opq.py", "modeling_hf_oto.py"]
    save_reference(pruned, inputs, tmp_path / "pruned")
    save_reference(quantized, inputs, tmp_path / "quantized")
    found = reload_in_fresh_process([tmp_path / "pruned", tmp_path / "quantized"], tmp_path, resave=True)
    assert all(r["worst"] == 0.0 for r in found.values()), found
    resaved = sorted(f for f in os.listdir(str(tmp_path / "quantized") + "-resaved") if f.endswith(".py"))
    assert resaved == py["quantized"]
