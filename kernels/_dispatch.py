"""When to run a Triton kernel and when its PyTorch fallback."""
import os

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
