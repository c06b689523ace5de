"""groups.summary(): per layer, prunable heads / neurons / experts, and why the rest are not."""

import re

from transformers import LlamaConfig, LlamaForCausalLM

from hf_oto import GroupConfig, find_groups
from hf_oto.testing.zoo import build


def _rows(text: str) -> dict[str, list[str]]:
    table = text.split("prunable / found, per layer:\n")[1].split("\n\n")[0].splitlines()
    kinds = table[0].split()[1:]
    return {line.split()[0]: dict(zip(kinds, line.split()[1:])) for line in table[1:]}


def test_deep_model_reads_as_one_row_per_distinct_layer():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    groups = find_groups(model, None, GroupConfig(exclude=[r"layers\.5\.mlp"]))
    text = groups.summary()
    rows = _rows(text)
    # Layers 0-4 and 6-11 are alike; layer 5 lost its neurons to the exclusion.
    assert rows["model.layers.0-4"] == {"head": "2/2", "neuron": "48/48", "hidden": "-"}
    assert rows["model.layers.5"] == {"head": "2/2", "neuron": "0/48", "hidden": "-"}
    assert rows["model.layers.6-11"] == rows["model.layers.0-4"]
    assert rows["lm_head"]["neuron"] == "0/64" and rows["<model>"]["hidden"] == "0/32"
    reasons = text.split("not prunable, and why:\n")[1].split("\n\n")[0].splitlines()
    assert "  48 neuron in model.layers.5: excluded by GroupConfig.exclude" in reasons
    assert "  64 neuron in lm_head: dimension of the model output" in reasons
    assert "  32 hidden in <model>: hidden pruning is off (GroupConfig.prune_hidden)" in reasons
    assert len(text.splitlines()) < 30


def test_mixture_of_experts_rows_count_experts():
    model, inputs = build("mixtral-moe")
    rows = _rows(find_groups(model, inputs).summary())
    assert rows["model.layers.0-1"] == {"head": "2/2", "neuron": "128/128", "expert": "0/4", "hidden": "-"}
    text = find_groups(model, inputs, GroupConfig(prune_experts=True)).summary()
    assert _rows(text)["model.layers.0-1"]["expert"] == "4/4"
    assert not re.search(r"\d+ expert in", text)


def test_reasons_name_the_op_and_module():
    model, inputs = build("bert-qa")
    text = find_groups(model, inputs).summary()
    assert re.search(r"parameters with no prunable structure:\n.*word_embeddings.weight \(dim 0\): rows are "
                     r"looked up by index.*aten\.embedding\.default in module 'bert\.embeddings\.word_embeddings'", text)
