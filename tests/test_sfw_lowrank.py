"""decompose_low_rank: best rank-r factors, the right layers, and models that save and reload."""

import json
import os

import pytest
import torch
from helpers import outputs, relative_difference, reload_in_fresh_process, save_reference
from torch import nn

import hf_oto
from hf_oto import compress, find_groups
from hf_oto.compress.hf_oto_layers import LAYER_TYPES
from hf_oto.compress.hf_oto_layers_lowrank import LowRankConv, LowRankLinear
from hf_oto.compress.lowrank import decompose_low_rank, kept_rank, low_rank_layers, rank_energy
from hf_oto.optim.sfw import SFW
from hf_oto.testing.zoo import build


def truncated(w, rank):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(w.dtype)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)).eval()


def test_factors_are_the_best_rank_r_approximation_and_outputs_follow():
    model = mlp()
    small = decompose_low_rank(model, 0.5)
    # 20x32 keeps 10, 32x32 keeps 16 (two factors would not be smaller: it stays dense), 32x6 keeps 3
    assert [(d.rank, d.factorized) for d in small.hf_oto_low_rank] == [(10, True), (16, False), (3, True)]
    reference = mlp()
    with torch.no_grad():
        for i, layer in enumerate(small):
            if isinstance(layer, (LowRankLinear, nn.Linear)):
                rank = kept_rank(min(model[i].weight.shape), 0.5)
                product = layer.weight
                torch.testing.assert_close(product, truncated(model[i].weight, rank), atol=1e-5, rtol=1e-4)
                reference[i].weight.copy_(product)
                assert torch.equal(layer.bias, model[i].bias)
    assert isinstance(small[0], LowRankLinear) and small[0].rank == 10
    x = torch.randn(5, 20)
    torch.testing.assert_close(small(x), reference(x))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert isinstance(model[0], nn.Linear)                         # not in place by default
    assert set(small._hf_oto_manifest["modules"]) == {"0", "4"}


def test_ratio_zero_changes_nothing_and_bad_ratios_raise():
    model = mlp()
    same = decompose_low_rank(model, 0.0)
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in same)
    x = torch.randn(3, 20)
    assert torch.equal(same(x), model(x))
    for bad in (-0.1, 1.0, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="rank_ratio"):
            decompose_low_rank(model, bad)


def test_layers_that_would_grow_stay_dense_with_the_truncated_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    kept = decompose_low_rank(model, 0.3)                       # rank 6: 6 * 16 >= 64
    assert all(type(m) is nn.Linear for m in kept)
    assert not any(d.factorized for d in kept.hf_oto_low_rank)
    torch.testing.assert_close(kept[0].weight, truncated(model[0].weight, 6))
    assert torch.linalg.matrix_rank(kept[0].weight.detach()).item() == 6
    forced = decompose_low_rank(model, 0.3, keep_dense_if_larger=False)
    assert all(isinstance(m, LowRankLinear) for m in forced)
    x = torch.randn(4, 8)
    torch.testing.assert_close(forced(x), kept(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_one_by_one_convolutions_keep_stride_padding_and_bias(dims):
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(0)
    model = nn.Sequential(conv_cls(12, 16, 1, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                          conv_cls(16, 4, 3, padding=1))                 # 3x3: not eligible
    assert list(low_rank_layers(model)) == ["0"]
    small = decompose_low_rank(model, 0.5)
    assert isinstance(small[0], LowRankConv) and small[0].rank == 6
    dense = conv_cls(12, 16, 1, stride=2, padding=1, padding_mode="reflect")
    with torch.no_grad():
        dense.weight.copy_(truncated(model[0].weight.flatten(1), 6).reshape(dense.weight.shape))
        dense.bias.copy_(model[0].bias)
    x = torch.randn(2, 12, *([7] * dims))
    torch.testing.assert_close(small[0](x), dense(x), atol=1e-5, rtol=1e-4)
    spec = small[0].manifest_spec()
    json.dumps(spec)
    rebuilt = LAYER_TYPES[spec["type"]].from_manifest(spec)
    rebuilt.load_state_dict(small[0].state_dict())
    assert torch.equal(rebuilt(x), small[0](x))


def test_gpt2_conv1d_is_factorised_and_the_tied_output_embedding_is_left_alone():
    model, inputs = build("gpt2")
    layers = low_rank_layers(model)
    assert "lm_head" not in layers and any(p.endswith("attn.c_attn") for p in layers)
    only_mlp = low_rank_layers(model, include=[r"\.mlp\."], exclude=[r"c_proj"])
    assert only_mlp and all(".mlp.c_fc" in p for p in only_mlp)
    small = decompose_low_rank(model, 0.5)
    assert small.lm_head.weight is small.transformer.wte.weight
    layer = small.get_submodule("transformer.h.0.attn.c_attn")
    original = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LowRankLinear)
    torch.testing.assert_close(layer.weight, truncated(original.weight.t(), layer.rank), atol=1e-5, rtol=1e-4)


def test_rank_energy_is_one_for_low_rank_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(10, 2) @ torch.randn(2, 10))
    assert rank_energy(model, 0.8) == pytest.approx(1.0)
    assert rank_energy(mlp(), 0.8) < 0.9


def test_plain_module_with_low_rank_layers_saves_and_reloads(tmp_path):
    model, inputs = build("mobilenet-block")
    small = decompose_low_rank(model, 0.5).eval()
    assert any(isinstance(m, LowRankConv) for m in small.modules())
    hf_oto.save_pretrained(small, tmp_path)
    fresh, _ = build("mobilenet-block")
    again = hf_oto.from_pretrained(tmp_path, model=fresh).eval()
    assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0


def _sfw_trained_bert():
    model, inputs = build("bert-seq-cls")
    model.train()
    groups = find_groups(model, inputs)
    opt = SFW.from_model(model, groups, structure="prune", lr=0.5, radius_factor=2.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=torch.randint(0, 120, (4, 10), generator=g),
                    labels=torch.randint(0, 3, (4,), generator=g))
        out.loss.backward()
        opt.step()
    return model.eval(), groups, inputs


def test_transformers_models_reload_in_a_fresh_process(tmp_path):
    """Low rank alone (BERT, ViT with renamed weights, GPT-2 Conv1D), and pruning then low rank
    on an SFW-trained BERT: trust_remote_code and hf_oto.from_pretrained give identical outputs."""
    cases = {}
    for name in ("bert-seq-cls", "vit", "gpt2"):
        model, inputs = build(name)
        cases[name] = (decompose_low_rank(model, 0.5).eval(), inputs)
    trained, groups, inputs = _sfw_trained_bert()
    pruned = compress(trained, groups, ratio=0.5)
    both = decompose_low_rank(pruned, 0.6).eval()
    assert sum(p.numel() for p in both.parameters()) < sum(p.numel() for p in trained.parameters())
    cases["bert-sfw-pruned-low-rank"] = (both, inputs)
    paths = []
    for name, (model, inputs) in cases.items():
        path = tmp_path / name
        model.save_pretrained(path)
        assert "hf_oto_layers_lowrank.py" in os.listdir(path)
        save_reference(model, inputs, path)
        paths.append(str(path))
    found = reload_in_fresh_process(paths, tmp_path)
    assert all("LowRankLinear" in r["layers"] and r["worst"] == 0.0 for r in found.values()), found
