"""Checkpoints whose weight names Transformers converts (GPT-NeoX's ``embed_out`` is ``lm_head`` in
memory) save and reload a compressed model exactly, with the names of the base format."""

import torch
from helpers import outputs, reload_in_fresh_process, save_reference, zero_random_groups
from safetensors import safe_open
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_oto import compress, find_groups


def test_renamed_weights_round_trip(tmp_path):
    cfg = GPTNeoXConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))}
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4)
    small = compress(model, groups)
    small.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in set(f.keys())  # the base format's name, as GPTNeoX saves it
    save_reference(small, inputs, tmp_path)
    assert reload_in_fresh_process([tmp_path], cwd=tmp_path.parent)[str(tmp_path)]["worst"] == 0.0
