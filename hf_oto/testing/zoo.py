"""Tiny models with random weights for tests and benchmarks (no downloads).

``ZOO`` maps a name to a builder returning ``(model, example_inputs)``. The Transformers entries
use small configs of the real architectures; the plain PyTorch entries cover the structures
Transformers models rarely have: BatchNorm chains, dense concatenation, skip concatenation in a
UNet, and depthwise convolutions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

ZooEntry = Callable[[], tuple[nn.Module, Any]]


def _text_inputs(vocab: int, batch: int = 2, length: int = 13) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _image_inputs(size: int, channels: int = 3, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      intermediate_size=96, max_position_embeddings=64, **extra)


def bert_qa():
    from transformers import BertForQuestionAnswering

    return BertForQuestionAnswering(_bert_config()), _text_inputs(120)


def bert_seq_cls():
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(_bert_config(num_labels=3)), _text_inputs(120)


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=96, max_position_embeddings=64, num_labels=2)
    inputs = _text_inputs(120)
    inputs["input_ids"] = inputs["input_ids"].clamp(min=3)  # avoid the padding id in positions
    return RobertaForSequenceClassification(cfg), inputs


def distilbert():
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    cfg = DistilBertConfig(vocab_size=120, dim=48, n_layers=2, n_heads=6, hidden_dim=96,
                           max_position_embeddings=64)
    return DistilBertForQuestionAnswering(cfg), _text_inputs(120)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=6, n_positions=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg), _text_inputs(120)


def llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg), _text_inputs(120)


def mixtral_moe():
    """Mixtral: 4 experts in 3-D tensors run through grouped_mm, a softmax router picking 2
    (renormalised over the two)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MixtralForCausalLM(cfg), _text_inputs(120)


def qwen2_moe():
    """Qwen2-MoE: routed experts without renormalisation, plus a shared expert behind a sigmoid gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                         norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2MoeForCausalLM(cfg), _text_inputs(120)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                    num_attention_heads=6, intermediate_size=96, num_labels=5)
    return ViTForImageClassification(cfg), _image_inputs(32)


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1], layer_type="bottleneck",
                       num_labels=5)
    return ResNetForImageClassification(cfg), _image_inputs(32)


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 1], num_stages=2, num_labels=5)
    return ConvNextForImageClassification(cfg), _image_inputs(32)


# -- plain PyTorch modules -------------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class VGGStyle(nn.Module):
    """Conv-BN-ReLU stacks with pooling, a flatten and an MLP classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, 16), _conv_bn(16, 16), nn.MaxPool2d(2),
                                      _conv_bn(16, 32), nn.MaxPool2d(2), _conv_bn(32, 32))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                        nn.Dropout(0.1), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DenseBlock(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier feature maps."""

    def __init__(self, cin: int = 8, growth: int = 6, layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.layers = nn.ModuleList()
        c = cin
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        out = torch.relu(self.norm(torch.cat(feats, dim=1)))
        return self.head(out.mean(dim=(2, 3)))


class UNetStyle(nn.Module):
    """Two-level UNet: encoder, bottleneck, transposed-conv upsampling and skip concatenation."""

    def __init__(self, cin: int = 3, base: int = 8, out_channels: int = 2) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(_conv_bn(cin, base), _conv_bn(base, base))
        self.enc2 = nn.Sequential(_conv_bn(base, base * 2), _conv_bn(base * 2, base * 2))
        self.pool = nn.MaxPool2d(2)
        self.mid = _conv_bn(base * 2, base * 4)
        self.up2 = nn.ConvTranspose2d(base * 4, base * 2, 2, stride=2)
        self.dec2 = nn.Sequential(_conv_bn(base * 4, base * 2), nn.Conv2d(base * 2, base * 2, 3, padding=1),
                                  nn.GroupNorm(4, base * 2), nn.SiLU())
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = _conv_bn(base * 2 + base, base)
        self.out = nn.Conv2d(base, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class MobileNetStyle(nn.Module):
    """Inverted residual blocks: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6(inplace=True))
        self.blocks = nn.ModuleList([self._block(16, 16, 4), self._block(16, 16, 4)])
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),
                                  nn.BatchNorm2d(16), nn.Conv2d(16, 24, 1), nn.Hardswish())
        self.head = nn.Linear(24, num_classes)

    @staticmethod
    def _block(cin: int, cout: int, expand: int) -> nn.Sequential:
        hidden = cin * expand
        return nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        x = self.down(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _plain(cls, size: int = 16) -> ZooEntry:
    def build():
        torch.manual_seed(0)
        model = cls()
        _randomise_norm_stats(model)
        return model, (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)),)
    build.__name__ = cls.__name__
    return build


def _randomise_norm_stats(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics so that exactness tests see them."""
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)


ZOO: dict[str, ZooEntry] = {
    "bert-qa": bert_qa,
    "bert-seq-cls": bert_seq_cls,
    "roberta": roberta,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "llama-gqa": llama_gqa,
    "mixtral-moe": mixtral_moe,
    "qwen2-moe": qwen2_moe,
    "vit": vit,
    "resnet": resnet,
    "convnext": convnext,
    "vgg-bn": _plain(VGGStyle),
    "densenet-block": _plain(DenseBlock),
    "unet": _plain(UNetStyle),
    "mobilenet-block": _plain(MobileNetStyle),
}

#: Zoo entries that are Transformers models (they save with ``save_pretrained``).
TRANSFORMERS_ZOO = [k for k in ZOO if k not in ("vgg-bn", "densenet-block", "unet", "mobilenet-block")]


def build(name: str) -> tuple[nn.Module, Any]:
    """Build zoo model ``name`` with fixed random weights; returns ``(model, example_inputs)``."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}")
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    model.eval()
    return model, inputs
