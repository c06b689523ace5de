"""Group-sparsity optimizers working on zero-invariant groups."""

from .base import GroupSparseOptimizer
from .dhspg import DHSPG
from .factory import OTOOptimizerFactory, create_oto_optimizer
from .hesso import HESSO
from .hspg import HSPG
from .selection import SelectionConfig
from .sfw import SFW

__all__ = ["GroupSparseOptimizer", "DHSPG", "HESSO", "HSPG", "SFW", "OTOOptimizerFactory", "SelectionConfig",
           "create_oto_optimizer"]
