"""Compressed models save as standard safetensors + manifest and reload exactly elsewhere."""

import json
import os

import pytest
from helpers import outputs, relative_difference, reload_in_fresh_process, save_reference, zero_random_groups

import hf_oto
from hf_oto import GroupConfig, compress, find_groups
from hf_oto.compress.modeling_hf_oto import auto_classes_for
from hf_oto.testing.zoo import TRANSFORMERS_ZOO, build

PLAIN = ["vgg-bn", "densenet-block", "unet", "mobilenet-block"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Compress every Transformers zoo model and save it with reference outputs."""
    root = tmp_path_factory.mktemp("saved")
    cases = {}
    # Two extra cases prune the hidden width too: their norms run padded after reloading.
    for name in TRANSFORMERS_ZOO + ["bert-qa+hidden", "llama-gqa+hidden"]:
        base, _, hidden = name.partition("+")
        model, inputs = build(base)
        groups = find_groups(model, inputs, GroupConfig(prune_hidden=bool(hidden)))
        zero_random_groups(model, groups, 0.5)
        small = compress(model, groups).eval()
        path = root / name
        # The manifest path is what is tested here: a model whose random zeros happen to leave its
        # layers uniform would otherwise be saved with a standard config (test_standard_config.py).
        small.save_pretrained(path, hf_oto_standard=False)
        save_reference(small, inputs, path)
        cases[name] = (small, path)
    return cases


def test_saved_files_and_manifest(saved):
    for name, (small, path) in saved.items():
        files = set(os.listdir(path))
        assert {"config.json", "model.safetensors", "modeling_hf_oto.py"} <= files, name
        config = json.loads((path / "config.json").read_text())
        manifest = config["hf_oto_manifest"]
        assert bool(manifest["paddings"]) == name.endswith("+hidden")
        base = manifest["base_class"]
        assert set(config["auto_map"]) == set(auto_classes_for(base))
        for tensor, shape in manifest["shapes"].items():
            assert list(small.get_parameter(tensor).shape if tensor in dict(small.named_parameters())
                        else small.get_buffer(tensor).shape) == shape


def test_reload_in_fresh_process(saved, tmp_path):
    """trust_remote_code, hf_oto.from_pretrained and a re-save all give the same outputs."""
    found = reload_in_fresh_process([p for _, p in saved.values()], tmp_path, resave=True)
    assert all(r["worst"] == 0.0 for r in found.values()), found


def test_plain_reload_without_manifest_fails_loudly(saved):
    """Without the manifest class, Transformers refuses the shapes instead of loading garbage."""
    from transformers import BertForQuestionAnswering

    _, path = saved["bert-qa"]
    with pytest.raises(Exception, match="size|shape"):
        BertForQuestionAnswering.from_pretrained(path)


def test_recompressing_a_compressed_model_keeps_one_manifest(tmp_path):
    model, inputs = build("bert-qa")
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.3, seed=1)
    small = compress(model, groups)
    groups2 = find_groups(small, inputs)
    zero_random_groups(small, groups2, 0.3, seed=2)
    smaller = compress(small, groups2)
    smaller.save_pretrained(tmp_path)
    again = hf_oto.from_pretrained(tmp_path)
    assert relative_difference(outputs(smaller, inputs), outputs(again, inputs)) == 0
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize("name", PLAIN)
def test_plain_module_save_and_reload(name, tmp_path):
    model, inputs = build(name)
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.5)
    small = compress(model, groups).eval()
    hf_oto.save_pretrained(small, tmp_path)
    fresh, _ = build(name)
    again = hf_oto.from_pretrained(tmp_path, model=fresh).eval()
    assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0
    with pytest.raises(ValueError, match="model="):
        hf_oto.from_pretrained(tmp_path)


def test_reloaded_weights_own_aligned_memory(saved):
    """Weights loaded from safetensors are views into the mapped file at its (unaligned) offsets,
    where CPU kernels sum in another order; the HfOto class gives each one its own allocation."""
    _, path = saved["resnet"]
    again = hf_oto.from_pretrained(path)
    tensors = list(again.parameters()) + list(again.buffers())
    assert all(t.data_ptr() % 64 == 0 for t in tensors if t.numel())


def test_a_mode_the_model_switched_to_while_running_is_saved_in_its_config(tmp_path):
    # BigBird switches block-sparse attention to full attention on short inputs, building the new
    # attention from the config: a reload from the original config rebuilt full-size attention
    # (a shape error on the first forward pass).
    import torch
    from transformers import BigBirdConfig, BigBirdForMaskedLM

    from hf_oto.compress.manifest import record_mode_switches

    torch.manual_seed(0)
    config = BigBirdConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, block_size=4, num_random_blocks=2)
    model = BigBirdForMaskedLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 12))}
    model(**inputs)                                         # 12 tokens: too short, switches to full attention
    assert model.bert.attention_type == "original_full" and config.attention_type == "block_sparse"
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4)
    small = compress(model, groups)
    assert small.config.attention_type == "original_full" and record_mode_switches(small) == {}
    assert model.config.attention_type == "block_sparse"    # the sparse model's config is left alone
    small.save_pretrained(tmp_path / "small")
    again = hf_oto.from_pretrained(tmp_path / "small")
    assert relative_difference(outputs(small, inputs), outputs(again, inputs)) == 0.0


def test_models_that_switch_nothing_record_nothing():
    from hf_oto.compress.manifest import record_mode_switches

    model, _ = build("bert-qa")
    assert record_mode_switches(model) == {}


def test_a_model_type_served_by_another_types_class_reloads(tmp_path):
    # pp_chart2table runs GotOcr2ForConditionalGeneration with its own PPChart2TableConfig. Loading
    # the remote code through an Auto class registers the class under the saved config's class,
    # which Transformers refuses when the class's config_class (GotOcr2Config) is another one.
    import torch
    from transformers import GotOcr2ForConditionalGeneration, PPChart2TableConfig

    from hf_oto.compress.modeling_hf_oto import compressed_class

    torch.manual_seed(0)
    config = PPChart2TableConfig(
        vision_config=dict(hidden_size=32, output_channels=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, window_size=2, global_attn_indexes=[0], mlp_dim=64),
        text_config=dict(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
        image_token_index=99)
    model = GotOcr2ForConditionalGeneration(config).eval()
    inputs = {"input_ids": torch.randint(0, 99, (2, 9))}
    groups = find_groups(model, inputs)
    zero_random_groups(model, groups, 0.4)
    small = compress(model, groups)
    assert type(small).config_class is PPChart2TableConfig
    assert type(small) is compressed_class(type(small).__name__)  # the name saved in auto_map finds it again
    small.save_pretrained(tmp_path)
    save_reference(small, inputs, tmp_path)
    assert reload_in_fresh_process([tmp_path], cwd=tmp_path.parent)[str(tmp_path)]["worst"] == 0.0
    # A config that is the base class's own keeps the plain name, as does a user's config class that
    # Transformers does not know (compress must not fail on it); a saved name that names an unknown
    # config is an error.
    bert, _ = build("bert-qa")
    assert compressed_class(type(bert).__name__, type(bert.config).__name__).__name__ == "HfOtoBertForQuestionAnswering"
    assert compressed_class("BertForQuestionAnswering", "MyBertConfig").__name__ == "HfOtoBertForQuestionAnswering"
    with pytest.raises(AttributeError, match="no config class named 'MyBertConfig'"):
        compressed_class("HfOtoBertForQuestionAnswering__MyBertConfig")
