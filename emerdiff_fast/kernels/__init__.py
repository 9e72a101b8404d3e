"""Triton kernels, `emerdiff_fast.kernels`.

Each op is a `torch.library` custom op (opaque to torch.compile, with a fake implementation
for tracing) that runs its Triton kernel on CUDA tensors - or on CPU tensors when
TRITON_INTERPRET=1, which is how CI tests them - and its plain-PyTorch fallback otherwise.
EMERDIFF_DISABLE_TRITON=1 forces the fallback everywhere (the kill switch).

The op sources live in the repository's top-level kernels/ folder, which has no __init__.py:
a checkout's root on sys.path (python -m from the root, pytest's pythonpath) then never
stands in for another package named `kernels` (Hugging Face's, which transformers imports).
In a checkout this package reads them from there; a wheel, an editable install's build and
a --target install carry copies beside this file (setup.py's build_py).
"""
import os as _os

if not _os.path.exists(_os.path.join(__path__[0], "modulate.py")):
    __path__.append(_os.path.join(_os.path.dirname(_os.path.dirname(__path__[0])), "kernels"))

from ._dispatch import triton_enabled  # noqa: E402
from .kmeans_step import kmeans_assign, kmeans_assign_torch, kmeans_update, kmeans_update_torch  # noqa: E402
from .modulate import modulate, modulate_torch  # noqa: E402
from .shared_attention import shared_attention, shared_attention_torch  # noqa: E402

__all__ = ["modulate", "modulate_torch", "kmeans_assign", "kmeans_assign_torch", "kmeans_update",
           "kmeans_update_torch", "shared_attention", "shared_attention_torch", "triton_enabled"]
