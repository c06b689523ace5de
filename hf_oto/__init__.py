"""hf_oto: Only-Train-Once structured pruning for Hugging Face Transformers."""

from .compress import CompressionError, compress, decompose_low_rank, from_pretrained, save_pretrained
from .graph import GroupConfig, find_groups
from .groups import ZeroInvariantGroup, ZeroInvariantGroups
from .trainer import OTOTrainer
from .training_args import OTOTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "find_groups",
    "compress",
    "decompose_low_rank",
    "from_pretrained",
    "save_pretrained",
    "CompressionError",
    "GroupConfig",
    "ZeroInvariantGroup",
    "ZeroInvariantGroups",
    "OTOTrainer",
    "OTOTrainingArguments",
]
