"""Triton kernels, installed as `emerdiff_fast.kernels`.

Each op is a `torch.library` custom op (opaque to torch.compile, with a fake implementation
for tracing) that runs its Triton kernel on CUDA tensors - or on CPU tensors when
TRITON_INTERPRET=1, which is how CI tests them - and its plain-PyTorch fallback otherwise.
EMERDIFF_DISABLE_TRITON=1 forces the fallback everywhere (the kill switch).
"""
if __name__ != "emerdiff_fast.kernels":
    # Found as a top-level "kernels" (a checkout's root on sys.path, as pytest.ini's pythonpath
    # puts it): transformers and diffusers probe for Hugging Face's `kernels` package under that
    # name and import it. Load nothing then: a second copy would register every custom op again
    # (the later registration wins, so launches were counted in the copy no test reads). No
    # version, so transformers finds no usable `kernels` package.
    __version__ = "N/A"
else:
    from ._dispatch import triton_enabled
    from .kmeans_step import kmeans_assign, kmeans_assign_torch, kmeans_update, kmeans_update_torch
    from .modulate import modulate, modulate_torch
    from .shared_attention import shared_attention, shared_attention_torch

    __all__ = ["modulate", "modulate_torch", "kmeans_assign", "kmeans_assign_torch", "kmeans_update",
               "kmeans_update_torch", "shared_attention", "shared_attention_torch", "triton_enabled"]
