"""DSP-converted models save and reload exactly: Transformers models through save_pretrained and
remote code in a fresh process, plain modules through hf_oto.save_pretrained."""

import json
import os

import pytest
import torch
from helpers import outputs, relative_difference, reload_in_fresh_process, save_reference

import hf_oto
from hf_oto import find_groups
from hf_oto.compress.hf_oto_layers_dsp import DSPConv, DSPLinear
from hf_oto.methods.dsp import DSPConfig, convert, find_dsp_layers
from hf_oto.testing.zoo import build


pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(name: str, mode: str, seed: int = 0):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    layers, _ = find_dsp_layers(model, DSPConfig(max_groups=3, min_in_channels=2))
    gen = torch.Generator().manual_seed(seed)
    assignments = {}
    with torch.no_grad():
        for path, layer in layers.items():
            n, c = layer.weight.shape[:2]
            a = torch.randint(0, 3, (n,), generator=gen)
            keep = torch.rand(3, c, generator=gen) < 0.5
            layer.weight.mul_(keep[a].float().view(n, c, *([1] * (layer.weight.dim() - 2))))
            assignments[path] = a
    return convert(model, assignments, groups=groups, mode=mode).eval(), inputs


def test_transformers_models_reload_in_a_fresh_process(tmp_path):
    cases = {}
    for name, mode in (("resnet", "split"), ("convnext", "grouped")):
        small, inputs = _converted(name, mode)
        path = tmp_path / name
        small.save_pretrained(path)
        save_reference(small, inputs, path)
        config = json.loads((path / "config.json").read_text())
        kinds = {spec["type"] for spec in config["hf_oto_manifest"]["modules"].values()}
        assert kinds <= {"DSPConv", "DSPLinear"} and kinds
        assert {"modeling_hf_oto.py", "hf_oto_layers.py", "hf_oto_layers_dsp.py"} <= set(os.listdir(path))
        cases[name] = path
    found = reload_in_fresh_process(cases.values(), tmp_path)
    for name, path in cases.items():
        kinds = {k for k in found[str(path)]["layers"] if k.startswith("DSP")}
        assert kinds and kinds <= {"DSPConv", "DSPLinear"}, kinds
        assert found[str(path)]["worst"] == 0.0, name


@pytest.mark.parametrize("mode", ["split", "grouped"])
def test_plain_module_save_and_reload(mode, tmp_path):
    small, inputs = _converted("vgg-bn", mode, seed=1)
    assert any(isinstance(m, (DSPConv, DSPLinear)) for m in small.modules())
    hf_oto.save_pretrained(small, tmp_path)
    fresh, _ = build("vgg-bn")
    again = hf_oto.from_pretrained(tmp_path, model=fresh).eval()
    assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0
    assert {type(m).__name__ for m in again.modules()} == {type(m).__name__ for m in small.modules()}
