"""Every zoo model: zero a random 30-60% of the groups, compress, and get the same outputs."""

import importlib

import pytest
import torch
from helpers import num_params, outputs, relative_difference, zero_random_groups

from hf_oto import CompressionError, compress, find_groups
from hf_oto.testing.zoo import ZOO, build


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_compressed_outputs_equal_sparse_outputs(name, fraction):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    assert groups.num_prunable > 0
    mask = zero_random_groups(model, groups, fraction, seed=int(fraction * 10))
    before = num_params(model)
    reference = outputs(model, inputs)

    small = compress(model, groups)

    assert isinstance(small, type(model))
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    removed = groups.feasible_removal(mask)
    assert removed.sum() > 0.8 * mask.sum()  # only layers that would go empty keep one group
    assert num_params(small) == before - groups.removed_param_count(removed)
    assert num_params(small) < before
    # The input model is untouched: same class, same sizes, same (sparse) outputs.
    assert num_params(model) == before
    assert relative_difference(reference, outputs(model, inputs)) == 0


def test_group_counts_bert():
    model, inputs = build("bert-qa")
    counts = find_groups(model, inputs).counts()
    cfg = model.config
    assert counts["head"] == {"total": cfg.num_hidden_layers * cfg.num_attention_heads,
                              "prunable": cfg.num_hidden_layers * cfg.num_attention_heads}
    assert counts["neuron"]["prunable"] == cfg.num_hidden_layers * cfg.intermediate_size
    assert counts["hidden"] == {"total": cfg.hidden_size, "prunable": 0}


def test_head_group_spans_q_k_v_rows_and_o_columns():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    head = next(g for g in groups if g.kind == "head")
    hidden, d = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    # q, k, v: d rows of (hidden weights + 1 bias); output projection: d columns of hidden.
    assert head.num_params == 3 * d * (hidden + 1) + d * hidden
    assert head.layer.endswith("layer.0.attention")
    touched = {s.tensor for s in groups.slices if (s.group == head.index).any()}
    assert {t.rsplit(".", 2)[-2] for t in touched} == {"query", "key", "value", "dense"}


def test_grouped_query_attention_kv_head_carries_its_query_heads():
    model, inputs = build("llama-gqa")
    groups = find_groups(model, inputs)
    cfg = model.config
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == cfg.num_hidden_layers * cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    # rep query heads (q rows, o columns) + one key head + one value head, no biases.
    assert all(g.num_params == (2 * rep * d + 2 * d) * cfg.hidden_size for g in heads)


def test_ffn_neuron_group_is_up_row_and_down_column():
    model, inputs = build("llama-gqa")
    groups = find_groups(model, inputs)
    neuron = next(g for g in groups if g.kind == "neuron" and g.prunable)
    assert neuron.num_params == 3 * model.config.hidden_size  # gate row, up row, down column
    assert neuron.layer.endswith("mlp")


def test_residual_channels_are_tied_across_blocks():
    model, inputs = build("resnet")
    groups = find_groups(model, inputs)
    by_group: dict[int, set[str]] = {}
    for s in groups.slices:
        for g in s.group.unique().tolist():
            by_group.setdefault(g, set()).add(s.tensor)
    # A residual channel of stage 0 touches the shortcut projection, both blocks' last convs and
    # their norms, and the next blocks' input columns.
    widest = max(by_group.values(), key=len)
    assert len([t for t in widest if t.endswith("normalization.weight")]) >= 3


def test_dense_concatenation_offsets():
    model, inputs = build("densenet-block")
    groups = find_groups(model, inputs)
    stem_channel = next(g for g in groups if any(
        s.tensor == "stem.weight" and s.dim == 0 and (s.group == g.index).any() for s in groups.slices))
    # Channel c of the stem is read at offset c by every later layer's norm and conv.
    norms = [s for s in groups.slices if s.tensor.endswith(".0.weight") and (s.group == stem_channel.index).any()]
    assert len(norms) == len(model.layers)
    positions = {int(s.index[s.group == stem_channel.index][0]) for s in norms}
    assert len(positions) == 1


def test_group_norm_blocks_are_units():
    model, inputs = build("unet")
    groups = find_groups(model, inputs)
    gn = next(s for s in groups.slices if s.tensor == "dec2.2.weight")
    sizes = torch.bincount(gn.group).tolist()
    sizes = [n for n in sizes if n]
    assert sizes == [model.dec2[2].num_channels // model.dec2[2].num_groups] * model.dec2[2].num_groups


def test_depthwise_conv_follows_its_input_channel():
    model, inputs = build("mobilenet-block")
    groups = find_groups(model, inputs)
    expand = next(s for s in groups.slices if s.tensor == "blocks.0.0.weight" and s.dim == 0)
    depthwise = next(s for s in groups.slices if s.tensor == "blocks.0.3.weight" and s.dim == 0)
    assert torch.equal(expand.group, depthwise.group)


def test_outputs_and_lookups_are_reported_unprunable():
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    out = [g for g in groups if g.layer == "qa_outputs"]
    assert out and not any(g.prunable for g in out)
    assert any("word_embeddings" in k and "looked up" in v for k, v in groups.unprunable_tensors.items())
    text = groups.summary()
    assert "qa_outputs" in text and "hidden" in text and "bert.encoder.layer.0-1" in text


def test_generate_after_compression_matches_sparse_model():
    for name in ("gpt2", "llama-gqa"):
        model, inputs = build(name)
        groups = find_groups(model, inputs)
        zero_random_groups(model, groups, 0.5)
        small = compress(model, groups)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids = inputs["input_ids"][:1, :5]
        expected = model.generate(ids, **kwargs)
        assert torch.equal(small.generate(ids, **kwargs), expected)


HIDDEN = ["bert-qa", "gpt2", "llama-gqa", "vit", "convnext"]


@pytest.mark.parametrize("name", HIDDEN)
def test_hidden_dimension_pruning_is_exact_with_padded_norms(name, tmp_path):
    """Removing residual-stream dims keeps LayerNorm/RMSNorm statistics: the norms run padded."""
    import hf_oto
    from hf_oto import GroupConfig

    model, inputs = build(name)
    groups = find_groups(model, inputs, GroupConfig(prune_hidden=True))
    hidden = [g for g in groups if g.kind == "hidden"]
    assert hidden and all(g.prunable and g.exact for g in hidden)
    mask = zero_random_groups(model, groups, 0.4, seed=3)
    before = num_params(model)
    reference = outputs(model, inputs)
    small = compress(model, groups)
    assert relative_difference(reference, outputs(small, inputs)) <= 1e-5
    assert num_params(small) == before - groups.removed_param_count(groups.feasible_removal(mask))
    small.save_pretrained(tmp_path)
    again = hf_oto.from_pretrained(tmp_path)
    assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0


def test_exactness_check_runs_in_full_float32_whatever_the_caller_chose(monkeypatch):
    # TF32 or bf16 matmuls chosen for training would make the sparse and the sliced model differ
    # by rounding (1.3e-3 of the scale on an H200 with TF32); the check runs in IEEE float32 and
    # gives the caller's settings back afterwards.
    core = importlib.import_module("hf_oto.compress.core")
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul)
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4, seed=1)
    seen = []
    run = core._run

    def recording_run(m, x):
        seen.append(tuple(b.fp32_precision for b in backends))
        return run(m, x)

    monkeypatch.setattr(core, "_run", recording_run)
    chosen = ("tf32", "tf32", "bf16")
    previous = tuple(b.fp32_precision for b in backends)
    try:
        for backend, value in zip(backends, chosen):
            backend.fp32_precision = value
        compress(model, groups)
        assert seen == [("ieee",) * 3] * 2  # the sparse and the compressed model
        assert tuple(b.fp32_precision for b in backends) == chosen
    finally:
        for backend, value in zip(backends, previous):
            backend.fp32_precision = value


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_compresses_within_its_rounding(dtype):
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4, seed=2)
    model = model.to(dtype)
    reference = outputs(model, inputs)

    small = compress(model, groups)

    assert next(small.parameters()).dtype == dtype
    assert relative_difference(reference, outputs(small, inputs)) <= 8 * torch.finfo(dtype).eps
    assert num_params(small) < num_params(model)


def test_half_precision_tolerance_still_catches_a_real_difference():
    core = importlib.import_module("hf_oto.compress.core")
    reference = [torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)]
    rounded = [(reference[0].float() * (1 + 2 ** -8)).to(torch.bfloat16)]  # about one bf16 unit
    core._verify(reference, rounded, 1e-5)
    wrong = [reference[0].clone()]
    wrong[0][0, 0] += 0.2 * reference[0].abs().max()  # a missed construct changes outputs this much
    with pytest.raises(CompressionError, match="differ from the sparse model"):
        core._verify(reference, wrong, 1e-5)
    with pytest.raises(CompressionError):  # float32 keeps its own tolerance
        core._verify([reference[0].float()], [rounded[0].float()], 1e-5)
