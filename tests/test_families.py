"""Families whose heads or channels need the general rules of the analysis: per-head q/k norms,
q/k norms over the whole projection, fused projections with grouped or shared key/value heads,
disentangled relative attention, a relative-position bias table shared by the layers, and a norm
across channels. Tiny configs of the real Transformers classes; 40% of the prunable groups zeroed;
compress, save and reload in a fresh process must reproduce the sparse model."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import num_params, outputs, relative_difference, reload_in_fresh_process, save_reference, zero_random_groups

from hf_oto import compress, find_groups

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def _falcon(**extra):
    return T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, bos_token_id=0, eos_token_id=0,
                                              pad_token_id=0, **extra))


# name: (builder, inputs, prunable counts per kind, decoder). Two layers of four query heads; with
# grouped key/value heads a head group is one key/value head with its two query heads.
FAMILIES = {
    # rsqrt(mean(x^2) + eps) over head_dim: finite at zero, so a zero head stays zero.
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER, head_dim=16)), _text_inputs,
              {"head": 4, "neuron": 192}, True),
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DECODER, head_dim=16, sliding_window=8)),
               _text_inputs, {"head": 4, "neuron": 192}, True),
    "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**DECODER, use_qk_norm=True)), _text_inputs,
               {"head": 4, "neuron": 192}, True),
    # q/k RMSNorm over all heads at once: the norm runs on its input zero-padded to full width.
    "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER)), _text_inputs,
              {"head": 4, "neuron": 192}, True),
    # Fused query_key_value viewed as (kv_heads, num_heads // num_kv_heads + 2, head_dim).
    "falcon-new": (lambda: _falcon(num_kv_heads=2, new_decoder_architecture=True), _text_inputs,
                   {"head": 4, "neuron": 512}, True),
    # One key/value head picked with qkv[..., [-2], :] and shared by every query head.
    "falcon-multi-query": (lambda: _falcon(multi_query=True), _text_inputs, {"head": 8, "neuron": 512}, True),
    "gemma-multi-query": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**dict(DECODER, num_key_value_heads=1),
                                                                   head_dim=16)),
                          _text_inputs, {"head": 8, "neuron": 192}, True),
    "gpt-bigcode": (lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, multi_query=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)), _text_inputs, {"head": 8, "neuron": 512}, True),
    "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        **TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, num_labels=3)),
        _text_inputs, {"head": 8, "neuron": 256}, False),
    # The relative-attention bias is computed once for all heads and passed to every layer: each
    # layer keeps its own heads' rows of it.
    "mpnet": (lambda: T.MPNetForSequenceClassification(T.MPNetConfig(**TEXT, num_labels=3)), _text_inputs,
              {"head": 8, "neuron": 256}, False),
    # ALiBi slopes built for all heads of the config, (batch * heads, 1, keys) and (heads, 1, keys).
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)),
              _text_inputs, {"head": 8, "neuron": 512}, True),
    "mpt": (lambda: T.MptForCausalLM(T.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)),
            _text_inputs, {"head": 8, "neuron": 512}, True),
    # Global response normalisation divides by the mean over channels: it runs padded.
    "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
        hidden_sizes=[16, 32], depths=[2, 1], num_stages=2, num_labels=5)), _image_inputs,
        {"neuron": 4 * 16 * 2 + 4 * 32}, False),
}


def _build(name):
    builder, inputs, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    return builder().eval(), inputs()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, one_thread):
    """Every family: groups, 40% of the prunable ones zeroed, compressed and saved."""
    root = tmp_path_factory.mktemp("families")
    cases = {}
    for name in FAMILIES:
        model, inputs = _build(name)
        groups = find_groups(model, inputs)
        mask = zero_random_groups(model, groups, 0.4, seed=1)
        small = compress(model, groups).eval()  # verifies the outputs itself
        path = root / name
        small.save_pretrained(path)
        save_reference(small, inputs, path)
        cases[name] = dict(model=model, inputs=inputs, groups=groups, mask=mask, small=small, path=path)
    return cases


@pytest.mark.parametrize("name", list(FAMILIES))
def test_structures_found_prunable(name, compressed):
    counts = compressed[name]["groups"].counts()
    for kind, expected in FAMILIES[name][2].items():
        assert counts[kind]["prunable"] == expected, (kind, counts)
    if "head" in counts:
        assert counts["head"]["prunable"] == counts["head"]["total"], compressed[name]["groups"].summary()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compressed_outputs_and_size(name, compressed):
    case = compressed[name]
    model, small, groups = case["model"], case["small"], case["groups"]
    assert relative_difference(outputs(model, case["inputs"]), outputs(small, case["inputs"])) < 1e-6
    removed = groups.feasible_removal(case["mask"])
    assert removed.sum() > 0
    assert num_params(small) == num_params(model) - groups.removed_param_count(removed)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[3]])
def test_greedy_generation_unchanged(name, compressed):
    case = compressed[name]
    ids = case["inputs"]["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(case["small"].generate(ids, **kwargs), case["model"].generate(ids, **kwargs))


def test_reload_in_fresh_process(compressed, tmp_path):
    found = reload_in_fresh_process([c["path"] for c in compressed.values()], tmp_path)
    assert all(r["worst"] == 0.0 for r in found.values()), found


def test_norms_over_removed_positions_run_padded(compressed):
    """OLMo-2's q/k norms span all heads and ConvNeXt V2's GRN averages over channels: both keep
    their full width and run on zero-padded inputs."""
    olmo = compressed["olmo2"]["small"].config.hf_oto_manifest["paddings"]
    assert any(path.endswith("self_attn.q_norm") for path in olmo)
    grn = compressed["convnextv2"]["small"].config.hf_oto_manifest["paddings"]
    assert grn and all(path.endswith(".grn") for path in grn)


def test_falcon_key_value_count_follows_the_kept_heads(compressed):
    """num_heads // num_kv_heads + 2 sizes a view inside each key/value group: both attributes shrink."""
    case = compressed["falcon-new"]
    attributes = case["small"].config.hf_oto_manifest["attributes"]
    for path, attrs in attributes.items():
        if "num_heads" in attrs:
            assert attrs["num_heads"] == 2 * attrs["num_kv_heads"], (path, attrs)
    assert any(a.get("num_kv_heads") == 1 for a in attributes.values())


def test_shared_bias_is_cut_to_each_layers_heads(compressed):
    """Every layer reads the bias computed once for all heads at its own kept heads only."""
    case = compressed["mpnet"]
    cuts = case["small"].config.hf_oto_manifest["inputs"]
    assert cuts and all(path.startswith("mpnet.encoder.layer.") for path in cuts)
    kept = {len(spec["kept"]) for specs in cuts.values() for spec in specs}
    assert kept and max(kept) < case["model"].config.num_attention_heads
    table = [g for g in case["groups"] if any(
        "relative_attention_bias" in s.tensor and (s.group == g.index).any() for s in case["groups"].slices)]
    assert table and not any(g.prunable for g in table)  # the table itself keeps every head


UNPRUNABLE_HEADS = {
    # Slices of the fused qkv use config.num_attention_heads * head_dim.
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER)), ("config", "num_attention_heads", "slice")),
    # Every layer normalises q and k with its own LayerNorm per head, picked by position in a list.
    "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**DECODER, qk_layernorm=True)),
                 ("cannot shrink", "attention")),
}


@pytest.mark.parametrize("name", list(UNPRUNABLE_HEADS))
def test_unprunable_heads_say_why(name):
    builder, words = UNPRUNABLE_HEADS[name]
    torch.manual_seed(0)
    model = builder().eval()
    groups = find_groups(model, _text_inputs())
    heads = [g for g in groups if g.kind == "head"]
    assert heads and not any(g.prunable for g in heads)
    for g in heads:
        assert all(w in g.reason for w in words), g.reason
        assert "self_att" in g.reason  # names the module
    assert groups.counts()["neuron"]["prunable"] > 0


class _UnitNorm(torch.nn.Module):
    """Hidden units in blocks of two, each block scaled by ``scale(block)``."""

    def __init__(self, scale) -> None:
        super().__init__()
        self.up, self.down, self.scale = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), scale
        self.num_blocks = 4

    def forward(self, x):
        h = self.up(x).view(x.shape[0], self.num_blocks, 2)
        return self.down((h * self.scale(h)).flatten(1))


@pytest.mark.parametrize("scale, prunable", [
    (lambda h: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), True),  # bounded away from zero
    (lambda h: torch.rsqrt(h.abs().mean(-1, keepdim=True)), False),  # infinite for a zero block
    (lambda h: 1.0 / (h.pow(2).sum(-1, keepdim=True) + 1.0), True),
])
def test_singular_ops_only_block_values_that_can_reach_zero(scale, prunable):
    model = _UnitNorm(scale)
    groups = find_groups(model, (torch.randn(5, 6),))
    blocks = [g for g in groups if any(s.tensor == "up.weight" and s.dim == 0 and (s.group == g.index).any()
                                       for s in groups.slices)]
    assert len(blocks) == 4 and all(g.prunable == prunable for g in blocks), groups.summary()
    if prunable:
        mask = torch.zeros(len(groups), dtype=torch.bool)
        mask[blocks[1].index] = True
        groups.zero_(groups.parameters(model), mask)
        small = compress(model, groups)
        assert small.up.out_features == 6 and small.num_blocks == 3
