"""When to run a Triton kernel and when its PyTorch fallback, and what every launch needs."""
import contextlib
import os
from collections import Counter

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except Exception:  # a broken or missing triton must not break the library
    HAVE_TRITON = False

KILL_SWITCH = "EMERDIFF_DISABLE_TRITON"


def triton_enabled(t) -> bool:
    """Triton for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; never if killed."""
    if not HAVE_TRITON or os.environ.get(KILL_SWITCH, "0") == "1":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton launches per op, counted by the ops themselves: tests assert that the kernel ran,
# not its fallback (with Triton missing or killed the counts stay put).
LAUNCHES: Counter = Counter()


def launch_guard(t):
    """Launch on t's device: Triton launches on the current CUDA device, so a tensor on
    cuda:1 needs the guard unless the caller ran torch.cuda.set_device(1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
