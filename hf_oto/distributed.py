"""Ending a multi-process run (torchrun, ``accelerate launch``) cleanly."""

from __future__ import annotations

import os
import sys


def leave_process_group() -> None:
    """End this rank's part of a multi-process run: destroy the process group and, on the CPU
    backend (gloo), leave the interpreter without its C++ teardown.

    Why: with gloo a rank sometimes aborts in that teardown after all its work is done
    ("terminate called without an active exception": a gloo thread outlives it; seen in about 1 of
    4 two-rank runs on a loaded machine), which turns a finished run into a failed launch. Call it
    last, once everything is written; it does nothing in a single-process run.

    Example:
        >>> from hf_oto.distributed import leave_process_group
        >>> leave_process_group()  # single process: returns without doing anything
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
