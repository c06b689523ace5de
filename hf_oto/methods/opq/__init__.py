"""One-shot pruning-quantization (OPQ; Hu et al., AAAI 2021), written from the paper's description.

From the pretrained weights alone, each layer gets a pruning ratio and a bit width for a global
compression rate; every channel of a layer shares one codebook; the allocation stays fixed while
the float weights fine-tune through a straight-through quantizer; the result exports as integer
codes + codebooks that reload with identical outputs.

**Compression rate** (of the quantized layers' weights): ``32 * N / S`` where ``N`` is their
number of weights and ``S = sum over layers of N_l * [mask] + K_l * b_l + C_l * 16 + 2**b_l * 32
+ O_l * 48``: a 1-bit pruning mask per weight (only for layers that prune), ``b_l``-bit codes for
the ``K_l`` kept weights, one fp16 scale per output channel (fp32 if a scale does not fit fp16),
the float32 codebook, and ``O_l`` outliers far beyond the fitted law (int32 position + fp16
value). Bits per weight are ``S / N = 32 / rate``. Exported tensors hold exactly these
bits (packed ``uint8``, each tensor rounded up to whole bytes); biases and unquantized layers stay
float32 and are reported apart.

Usage:
    >>> from hf_oto.methods.opq import allocate, quantize, compression_report   # doctest: +SKIP
    >>> small = quantize(model, target_rate=8)          # one shot, no data       # doctest: +SKIP
    >>> compression_report(small)["bits_per_weight"]                           # doctest: +SKIP
    4.0
    >>> small.save_pretrained("out/")                                          # doctest: +SKIP

With fine-tuning: ``OPQMethod`` (``oto_method="opq"``) or ``attach_quantizers`` + training +
``export``. How the paper was checked and what was derived here: see :mod:`.theory` (closed
forms) and :mod:`.allocation` (Lagrangian).

Relation to the paper (Hu, Peng, Zhu, Aly, Lin, "OPQ: Compressing Deep Neural Networks with
One-shot Pruning-Quantization", AAAI 2021, arXiv 2205.11141). Confirmed from its abstract,
introduction and pipeline figure (no code of it was read or used): pruning masks and
quantization steps are solved analytically from the pretrained weights only and stay fixed while
fine-tuning updates the weights, and all channels of a layer share one codebook to avoid
per-channel codebook overhead. Not checked against the paper's equations (not available here),
so derived on our own from the design brief: the Laplace/Gaussian fit, magnitude pruning and
quantization solved jointly in one Lagrangian on the bit count, quantization levels that start at
the pruning threshold (the dead zone wastes no level), exact expected errors instead of the
``step^2/12`` approximation, channels mapped to the common range by their fitted scale, and the
exact storage of outliers (our addition for transformer weights).
"""

from .allocation import LayerAllocation, OPQAllocation, allocate, quantizable_layers
from .config import OPQConfig
from .export import compression_report, export, quantize, safetensors_tensor_bytes
from .method import OPQMethod
from .quantizer import OPQQuantizer, attach_quantizers, build_quantizer, quantization_stats

__all__ = [
    "OPQConfig",
    "OPQAllocation",
    "LayerAllocation",
    "OPQMethod",
    "OPQQuantizer",
    "allocate",
    "attach_quantizers",
    "build_quantizer",
    "export",
    "quantize",
    "compression_report",
    "quantization_stats",
    "quantizable_layers",
    "safetensors_tensor_bytes",
]
