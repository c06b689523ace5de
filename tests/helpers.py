"""Shared test helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import accelerate
import pytest
import torch

from hf_oto import ZeroInvariantGroups
from hf_oto.compress.core import _run, max_relative_difference

# FSDP2 through accelerate (fsdp_version) arrived in accelerate 1.6; the optimizers' own FSDP2
# path needs only torch.
needs_accelerate_fsdp2 = pytest.mark.skipif(
    not hasattr(accelerate.utils.FullyShardedDataParallelPlugin, "fsdp_version"),
    reason=f"FSDP2 through accelerate needs accelerate >= 1.6 (installed: {accelerate.__version__})")
# Resuming a sharded (SHARDED_STATE_DICT) Trainer checkpoint under FSDP2: accelerate 1.8 loads the
# optimizer's state with a plan that misses keys; 1.15 (the newest checked) resumes bit for bit.
needs_accelerate_fsdp2_resume = pytest.mark.skipif(
    tuple(int(x) for x in accelerate.__version__.split(".")[:2]) < (1, 15),
    reason=f"resuming FSDP2 Trainer checkpoints needs accelerate >= 1.15 (installed: {accelerate.__version__})")


def zero_random_groups(model, groups: ZeroInvariantGroups, fraction: float, seed: int = 0) -> torch.Tensor:
    """Zero a random ``fraction`` of the prunable groups in place; returns the mask."""
    gen = torch.Generator().manual_seed(seed)
    prunable = groups.prunable_mask.nonzero().flatten()
    chosen = prunable[torch.randperm(prunable.numel(), generator=gen)[: int(round(fraction * prunable.numel()))]]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[chosen] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    return mask


def outputs(model, inputs) -> list[torch.Tensor]:
    return _run(model, inputs)


def relative_difference(a, b) -> float:
    return max_relative_difference(a, b)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def group_element_mask(groups: ZeroInvariantGroups, name: str, t: torch.Tensor, g: int) -> torch.Tensor:
    """The entries of tensor ``name`` (shaped like ``t``) that group ``g`` covers, built naively."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    for s in groups.slices:
        if s.tensor == name:
            sl = [slice(None)] * t.dim()
            sl[s.dim] = s.index[s.group == g]
            mask[tuple(sl)] = True
    return mask


_RELOAD_SCRIPT = '''
import json, sys, torch, transformers
import hf_oto
from hf_oto.compress.core import _run, max_relative_difference
resave, found = sys.argv[1] == "1", {}
for path in sys.argv[2:]:
    ref = torch.load(path + "/reference.pt")
    torch.set_num_threads(ref["threads"])  # threads split reductions: same split, same sums
    auto = next(iter(json.load(open(path + "/config.json"))["auto_map"]))
    remote = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True)
    models = [remote, hf_oto.from_pretrained(path)]
    if resave:
        remote.save_pretrained(path + "-resaved")
        models.append(getattr(transformers, auto).from_pretrained(path + "-resaved", trust_remote_code=True))
    found[path] = {
        "module": type(remote).__module__,
        "layers": sorted({type(m).__name__ for m in remote.modules()}),
        "worst": max(max_relative_difference(ref["outputs"], _run(m, ref["inputs"])) for m in models),
    }
print(json.dumps(found))
'''


def save_reference(model, inputs, path) -> None:
    """Outputs of a saved model on its inputs, for :func:`reload_in_fresh_process`, with the
    thread count they were computed with (the reload uses the same)."""
    torch.save({"inputs": inputs, "outputs": outputs(model, inputs), "threads": torch.get_num_threads()},
               os.path.join(path, "reference.pt"))


def reload_in_fresh_process(paths, cwd, resave: bool = False) -> dict:
    """Load saved folders in a new Python process with ``trust_remote_code`` and with
    ``hf_oto.from_pretrained`` (and, if ``resave``, again after re-saving the remote-code model).

    Returns ``{path: {"module", "layers", "worst"}}``: the loaded class's module, the layer class
    names, and the largest relative output difference from ``reference.pt`` over those loads.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, "1" if resave else "0", *map(str, paths)],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == {str(p) for p in paths}
    assert all(r["module"].startswith("transformers_modules") for r in found.values()), found
    return found
