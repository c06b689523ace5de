"""torch.export and ONNX (dynamo exporter) of compressed models, uniform and not, against eager outputs."""

import importlib.util
import warnings

import pytest
import torch
import transformers

import hf_oto
from hf_oto import compress, find_groups
from hf_oto.compress.modeling_hf_oto import MANIFEST_KEY
from hf_oto.testing.zoo import build

from helpers import zero_random_groups
from test_standard_config import _zero_uniformly


def _compressed(name, uniform, tmp_path):
    """A compressed zoo model: uniform ones go through a standard-config save and a plain reload."""
    model, inputs = build(name)
    model.eval()
    groups = find_groups(model, inputs)
    if uniform:
        _zero_uniformly(model, groups, ("head", "neuron"))
    else:
        zero_random_groups(model, groups, 0.4, seed=1)
    small = compress(model, groups).eval()
    if uniform:
        assert hf_oto.save_pretrained(small, tmp_path / name) == ""
        small = getattr(transformers, type(model).__name__).from_pretrained(tmp_path / name).eval()
        assert not hasattr(small.config, MANIFEST_KEY)
    else:
        assert getattr(small.config, MANIFEST_KEY, None)
    if hasattr(small.config, "use_cache"):
        small.config.use_cache = False  # a tensor-only output; caches are not what is compared here
    return small, inputs


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


_CASES = [("llama-gqa", True), ("vit", True), ("llama-gqa", False), ("bert-qa", False)]


@pytest.mark.parametrize("name, uniform", _CASES)
def test_torch_export_matches_eager(name, uniform, tmp_path):
    model, inputs = _compressed(name, uniform, tmp_path)
    with torch.no_grad():
        eager = _first(model(**inputs))
        program = torch.export.export(model, (), kwargs=inputs, strict=False)
        exported = _first(program.module()(**inputs))
    assert exported.shape == eager.shape
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, uniform", _CASES)
def test_onnx_dynamo_export_matches_eager(name, uniform, tmp_path):
    for needed in ("onnxscript", "onnx", "onnxruntime"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed (pip install hf_oto[export])")
    model, inputs = _compressed(name, uniform, tmp_path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = _first(model(**inputs))
        program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True, verbose=False)
        program.save(str(tmp_path / "model.onnx"))
        result = program(**inputs)[0]
    import onnx

    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    assert tuple(result.shape) == tuple(eager.shape)
    torch.testing.assert_close(torch.as_tensor(result), eager, rtol=1e-4, atol=1e-5)
