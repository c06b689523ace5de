"""Building, saving and loading the compressed model."""

from .core import CompressionError, compress, smallest_groups
from .lowrank import decompose_low_rank
from .saving import from_pretrained, save_pretrained
from .standard import standard_config

__all__ = ["compress", "CompressionError", "smallest_groups", "decompose_low_rank", "from_pretrained", "save_pretrained",
           "standard_config"]
