"""Layer types that compression methods put into a model, by name, for the structure manifest.

Saved next to ``modeling_hf_oto.py`` (it is a relative import, so Transformers copies it with the
remote code); imports only ``torch``. Each layer class implements

* ``manifest_spec(self) -> dict``: JSON-able constructor arguments (shapes, not values) with a
  ``"type"`` key naming the class in ``LAYER_TYPES``, and
* ``from_manifest(cls, spec) -> nn.Module``: an empty layer whose parameters and buffers have the
  saved shapes, ready for ``load_state_dict``.

Methods register their classes in their own ``hf_oto_layers_<method>.py`` file.
"""

from __future__ import annotations

from .hf_oto_layers_dsp import LAYER_TYPES as _DSP_LAYERS
from .hf_oto_layers_lowrank import LAYER_TYPES as _LOWRANK_LAYERS
from .hf_oto_layers_opq import LAYER_TYPES as _OPQ_LAYERS

LAYER_TYPES: dict[str, type] = {**_DSP_LAYERS, **_LOWRANK_LAYERS, **_OPQ_LAYERS}
