"""Peak memory of the temporaries an optimizer step allocates, on CPU (which has no allocator
statistics): shared by ``bench/optim_step.py`` and ``bench/memory.py``."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_oto.optim._sharding import local


class PeakTemporaries(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside the mode and still alive (freed ones are
    subtracted as they go); a DTensor result counts by its local shard. Storages in ``existing``
    (parameters, gradients, state held before the step) are not counted.

    Example:
        >>> x = torch.zeros(1000)
        >>> with PeakTemporaries({x.untyped_storage().data_ptr()}) as mode:
        ...     y = x + 1                     # 4,000 bytes, alive at the end
        ...     del y
        >>> mode.peak
        4000
    """

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.sizes, self.live, self.peak = existing, {}, 0, 0

    def _free(self, ptr: int) -> None:
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = local(t).untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self.existing and ptr not in self.sizes:
                    self.sizes[ptr] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr)
        return out
