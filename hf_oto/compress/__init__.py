"""Building, saving and loading the compressed model."""

from .core import CompressionError, compress
from .saving import from_pretrained, save_pretrained

__all__ = ["compress", "CompressionError", "from_pretrained", "save_pretrained"]
