"""OPQ quantizers, fine-tuning, export and reload: codes round-trip exactly, fine-tuning keeps the
allocation, exported models reproduce the fine-tuned outputs bit for bit and reload elsewhere."""

import copy
import json

import pytest
import torch
from helpers import outputs, relative_difference, reload_in_fresh_process, save_reference, zero_random_groups
from torch import nn

import hf_oto
from hf_oto import compress, find_groups
from hf_oto.compress.hf_oto_layers_opq import OPQLayer, pack_bits, unpack_bits
from hf_oto.methods import available_methods, get_method
from hf_oto.methods.opq import (OPQMethod, allocate, attach_quantizers, build_quantizer, compression_report, export,
                                quantize, quantization_stats)
from hf_oto.methods.opq.quantizer import quantized_modules
from hf_oto.testing.zoo import build


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 13, 1000):
        values = torch.randint(0, 2 ** bits, (count,), generator=g)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, count), values)


class Mixed(nn.Module):
    """Every layer kind OPQ replaces: embedding, conv (reflect padding), GPT-2 Conv1D, linear."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 24, 3, padding=1, padding_mode="reflect")
        self.conv2d = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.proj = Conv1D(32, 24)
        self.head = nn.Linear(32 + 4, 5)

    def forward(self, ids, image):
        x = self.conv(self.embed(ids).transpose(1, 2)).relu().transpose(1, 2).contiguous()
        x = self.proj(x).mean(1)
        y = self.conv2d(image).mean((2, 3))
        return self.head(torch.cat([x, y], dim=1))


def mixed_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 50, (3, 11), generator=g), torch.randn(3, 1, 8, 8, generator=g)


ALL_KINDS = dict(layer_types=("linear", "conv", "embedding"))


def test_quantize_dequantize_is_exact_on_the_codebook():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    model = nn.Sequential(layer)
    alloc = allocate(model, target_rate=10.0)
    q = build_quantizer(layer.weight, alloc["0"])
    once = q.quantized(layer.weight)
    # Weights on the codebook (times their channel scale) come back bit for bit, with the same codes.
    assert torch.equal(q.quantized(once), once)
    assert torch.equal(q.codes(once)[q.mask], q.codes(layer.weight)[q.mask])
    # Any code pattern: codebook[j] * s_c round-trips.
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2 ** q.bits, layer.weight.shape, generator=g)
    on_book = q.codebook[codes] * q.scales.float()[:, None]
    back = q.quantized(on_book)
    assert torch.equal(back[q.mask], on_book[q.mask]) and bool((back[~q.mask] == 0).all())
    # The codebook is shared by all channels: 2**bits values, no per-channel table.
    assert q.codebook.shape == (2 ** q.bits,)


def test_straight_through_gradient_is_the_masked_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    attach_quantizers(model, allocate(model, target_rate=12.0))
    layer = model[0]
    q = layer.parametrizations.weight[0]
    x, g = torch.randn(8, 32), torch.randn(8, 16)
    (model(x) * g).sum().backward()
    expected = (g.T @ x) * q.mask
    assert torch.allclose(layer.parametrizations.weight.original.grad, expected, atol=1e-6)
    assert bool((layer.parametrizations.weight.original.grad[~q.mask] == 0).all())
    assert 0 < int((~q.mask).sum())  # the check covered pruned weights


def _fine_tune(model, loss_fn, steps=4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_fine_tuning_keeps_the_allocation_and_export_is_exact(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    ids, image = mixed_inputs()
    alloc = allocate(model, target_rate=8.0, **ALL_KINDS)
    assert {layer.kind for layer in alloc} == {"embedding", "conv", "conv1d_hf", "linear"}
    attach_quantizers(model, alloc)
    before = {name: {k: v.clone() for k, v in q.state_dict().items()} for name, _, q in quantized_modules(model)}
    weights_before = {name: m.parametrizations.weight.original.detach().clone() for name, m, _ in quantized_modules(model)}
    _fine_tune(model, lambda m: m(ids, image).pow(2).mean())
    for name, module, q in quantized_modules(model):
        for key, value in q.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)  # masks, scales, codebook fixed
        original = module.parametrizations.weight.original
        assert bool((original[~q.mask] == 0).all())  # pruned weights stay zero
        assert not torch.equal(original, weights_before[name])  # the kept ones trained
    with torch.no_grad():
        reference = model(ids, image)
    small = export(model)
    assert quantized_modules(model)  # export copies by default
    with torch.no_grad():
        assert torch.equal(small(ids, image), reference)
    report = compression_report(small)
    assert report["compression_rate"] == pytest.approx(8.0, rel=0.01)
    assert quantization_stats(model)["opq_compression_rate"] == pytest.approx(report["compression_rate"])
    hf_oto.save_pretrained(small, tmp_path)
    again = hf_oto.from_pretrained(tmp_path, model=Mixed())
    assert all(isinstance(again.get_submodule(n), OPQLayer) for n in ("embed", "conv", "conv2d", "proj", "head"))
    with torch.no_grad():
        assert torch.equal(again(ids, image), reference)


@pytest.fixture(scope="module")
def saved_transformers(tmp_path_factory):
    """One-shot OPQ of Transformers zoo models, and OPQ after structured pruning, saved."""
    root = tmp_path_factory.mktemp("opq")
    cases = {}
    for name in ("bert-seq-cls", "gpt2", "llama-gqa"):
        model, inputs = build(name)
        kinds = ("linear", "embedding") if name == "bert-seq-cls" else ("linear",)
        small = quantize(model, target_rate=8.0, distribution="auto", layer_types=kinds).eval()
        cases[name] = (small, inputs)
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4)
    pruned = compress(model, groups)
    cases["bert-qa-structured"] = (quantize(pruned, target_rate=10.0).eval(), inputs)
    for name, (small, inputs) in cases.items():
        small.save_pretrained(root / name)
        save_reference(small, inputs, root / name)
    return root, cases


def test_saved_tensors_are_compact(saved_transformers):
    from safetensors import safe_open

    root, cases = saved_transformers
    with safe_open(str(root / "bert-seq-cls" / "model.safetensors"), "pt") as f:
        dtypes = {k.rpartition(".")[2]: f.get_slice(k).get_dtype() for k in f.keys()
                  if k.startswith("bert.encoder.layer.0.attention.self.query.")}
    assert dtypes["codes"] == "U8" and dtypes["codebook"] == "F32" and dtypes["scales"] == "F16"
    assert dtypes.get("mask", "U8") == "U8" and "weight" not in dtypes
    assert isinstance(cases["bert-seq-cls"][0].bert.embeddings.word_embeddings, OPQLayer)
    config = json.loads((root / "bert-qa-structured" / "config.json").read_text())
    manifest = config["hf_oto_manifest"]
    # OPQ layers replace the structurally resized linears and carry their pruned shapes.
    modules = manifest["modules"]
    assert all(spec["type"].startswith("OPQ") for spec in modules.values())
    assert not any(path.startswith(tuple(modules)) for path in manifest["shapes"])
    widths = [spec["weight_shape"][0] for path, spec in modules.items() if "intermediate" in path]
    heads = [spec["weight_shape"][0] for path, spec in modules.items() if path.endswith("self.query")]
    assert widths and max(widths) < 96 and heads and max(heads) < 48  # zoo BERT: FFN 96, hidden 48


def test_reload_in_fresh_process_is_exact(saved_transformers, tmp_path):
    root, cases = saved_transformers
    found = reload_in_fresh_process([root / name for name in cases], tmp_path, resave=True)
    assert all(r["worst"] == 0.0 for r in found.values()), found


def test_method_protocol_on_a_structurally_pruned_model():
    """What OTOTrainer does with oto_method="opq": prepare, default optimizer, steps, finalize."""
    assert "opq" in available_methods()
    cls = get_method("opq")
    assert cls is OPQMethod and cls.exact and not cls.needs_groups
    model, inputs = build("bert-seq-cls")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.3)
    pruned = compress(model, groups)
    pristine = copy.deepcopy(pruned)
    method = cls(target_rate=10.0, distribution="auto")
    prepared = method.prepare(pruned, None)
    assert method.create_optimizer(prepared, None, None) is None and method.regularizer(prepared) is None
    labels = torch.tensor([0, 2])
    _fine_tune(prepared, lambda m: m(**inputs, labels=labels).loss, steps=3)
    metrics = method.metrics(prepared, None)
    assert metrics["opq_compression_rate"] == pytest.approx(10.0, rel=0.01)
    reference = outputs(prepared, inputs)
    final = method.finalize(prepared, None)
    assert relative_difference(reference, outputs(final, inputs)) == 0.0
    # The saved state restores the allocation: a resumed run quantizes exactly the same way.
    state = json.loads(json.dumps(method.state_dict()))
    resumed = cls()
    resumed.load_state_dict(state)
    again = resumed.prepare(pristine, None)
    for (name, _, q1), (_, _, q2) in zip(quantized_modules(prepared), quantized_modules(again)):
        assert torch.equal(q1.mask, q2.mask) and torch.equal(q1.codebook, q2.codebook), name
    assert resumed.prepare(again, None) is again  # preparing twice is a no-op


def test_export_and_attach_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no OPQ quantizer"):
        export(model)
    alloc = allocate(model, target_rate=6.0)
    attach_quantizers(model, alloc)
    with pytest.raises(ValueError, match="already"):
        attach_quantizers(model, alloc)
    with pytest.raises(ValueError, match="either an allocation or"):
        quantize(nn.Sequential(nn.Linear(8, 8)), allocation=alloc, target_rate=8.0)
    other = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="shape"):
        attach_quantizers(other, alloc)
