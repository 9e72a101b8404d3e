"""Attention processors that record, inject and modulate (SPEC 1.5-1.6).

Installed through diffusers' attention-processor API (`unet.set_attn_processor`), never by
replacing a module's forward. Two families:

* `ReferenceProcessor` - the literal method: the reference run records each layer's Q and K
  per step; a modulated run recomputes P = softmax(Q K^T / sqrt(d)) from them and applies
  it to its own V.
* `SharedProcessor` - the fast path: batch member 0 *is* the reference run, so P is computed
  once per layer and step from member 0's Q and K and applied to every member's V in one
  matrix product. Exact by construction: the reference path also applies, at each layer and
  step, the P of the unmodulated run to the modulated run's V; here that unmodulated run
  simply advances in the same batch instead of being replayed from storage.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from emerdiff_fast import kernels


def _check_supported(attn, attention_mask):
    # SD's transformer blocks never use these; refuse rather than silently differ from diffusers.
    if attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None:
        raise NotImplementedError("EmerDiff processors support SD transformer-block attention only "
                                  "(no spatial/group norm, no attention mask)")


def _context(attn, hidden_states, encoder_hidden_states):
    if encoder_hidden_states is None:
        return hidden_states
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


def _finish(attn, out, residual):
    """The output tail of diffusers' AttnProcessor after to_out (identity in SD)."""
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def attention_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T * scale) per (batch * head), in Q's dtype: diffusers' get_attention_scores
    (its upcast_attention / upcast_softmax rules) without its baddbmm(torch.empty(...), beta=0).
    Under torch.compile, inductor's matmul templates have read that uninitialised input when
    beta is 0, giving NaN rows; a plain bmm has no such input. Every processor here uses it,
    so the reference and fast paths compute P the same way."""
    dtype = q.dtype
    if attn.upcast_attention:
        q, k = q.float(), k.float()
    scores = torch.bmm(q, k.transpose(-1, -2)).mul_(attn.scale)  # in place: one P-sized buffer
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def plain_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    """diffusers' AttnProcessor arithmetic, explicit: (output, probabilities (B * heads, N, M)),
    for processors that read the probabilities of an otherwise unchanged layer."""
    _check_supported(attn, attention_mask)
    context = _context(attn, hidden_states, encoder_hidden_states)
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    probs = attention_probs(attn, q, attn.head_to_batch_dim(attn.to_k(context)))
    out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(context))))
    return _finish(attn, attn.to_out[1](attn.to_out[0](out)), hidden_states), probs


@dataclass
class Modulation:
    """What the modulated layer adds: member b gets coef[b] * masks[index[b]] (SPEC 1.6)."""

    masks: torch.Tensor  # (K, N) float {0, 1} low-resolution masks, N = h * w
    index: torch.Tensor  # (B,) int64 mask of each batch member
    coef: torch.Tensor   # (B,) float: +lam, -lam, or 0 (the reference member, padding)


def modulation_term(m: Modulation, dtype) -> torch.Tensor:
    """(B, N, 1): what the modulated layer's output gains, c_b * M_{i_b} per position."""
    return (m.coef[:, None] * m.masks[m.index]).to(dtype)[:, :, None]


@dataclass
class RunState:
    """Shared by all processors of one denoising run; the engine moves `step` along."""

    mode: str = "record"              # "record" | "inject" (reference) | "shared" (fast)
    step: int = 0
    modulated_layer: str = ""
    modulation: Modulation | None = None
    modulate_now: bool = False        # set per step by the loop; a bool, so compile sees 2 cases
    store: dict = field(default_factory=dict)  # (layer, step) -> (q, k), reference path only


class ReferenceProcessor:
    """Literal SPEC: explicit softmax(QK^T/sqrt(d)) V via diffusers' own helpers."""

    def __init__(self, name: str, state: RunState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        _check_supported(attn, attention_mask)
        st = self.state
        context = _context(attn, hidden_states, encoder_hidden_states)
        if st.mode == "record":
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(context))
            st.store[(self.name, st.step)] = (q, k)
        else:  # inject the reference run's probabilities at this layer and step
            q, k = st.store[(self.name, st.step)]
        probs = attention_probs(attn, q, k)
        if probs.shape[0] == attn.heads * hidden_states.shape[0]:  # the reference run itself
            out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(context))))
        else:  # one reference P for every batch member: applied by broadcasting, never copied per
            # member (a repeat would hold batch x heads x N x M, ~16 GB per 64x64 layer at chunk 60)
            out = kernels.shared_attention_torch(probs, attn.to_v(context))
        out = attn.to_out[1](attn.to_out[0](out))
        if self.name == st.modulated_layer and st.modulate_now:
            out = out + modulation_term(st.modulation, out.dtype)
        return _finish(attn, out, hidden_states)


def shared_probs(attn, q0: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
    """(1, N, C), (1, M, C) -> per-head softmax(Q K^T * scale): (heads, N, M), by the same
    attention_probs as the reference path, so P is bit-identical to its."""
    return attention_probs(attn, attn.head_to_batch_dim(q0), attn.head_to_batch_dim(k0))


class SharedProcessor:
    """Fast path. Member 0 is the unmodulated reference run; its P serves every member.

    Self-attention: out_b = P V_b for all b as one product (heads, N, N) x (heads, N, B*d).
    Cross-attention (reuse_cross=True): with P shared and the text context the same for
    every member, the output P V_text does not depend on the member at all, so it is
    computed once and broadcast; at the modulated layer only the per-member c_b * M_{i_b}
    differs, which the fused modulation op adds while broadcasting (fused_modulation=True;
    else the plain PyTorch expression). reuse_cross=False treats cross-attention like
    self-attention (one V per member): the waterfall benchmark's "before" row.
    fused_attention=True applies P with the shared_attention op (no permute copies of V).
    """

    def __init__(self, name: str, state: RunState, *, reuse_cross: bool = True, fused_modulation: bool = True,
                 fused_attention: bool = False):
        self.name, self.state = name, state
        self.reuse_cross, self.fused_modulation, self.fused_attention = reuse_cross, fused_modulation, fused_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        _check_supported(attn, attention_mask)
        batch, n, channels = hidden_states.shape
        context = _context(attn, hidden_states, encoder_hidden_states)
        probs = shared_probs(attn, attn.to_q(hidden_states[:1]), attn.to_k(context[:1]))
        heads, d = attn.heads, channels // attn.heads
        st = self.state
        modulate = self.name == st.modulated_layer and st.modulate_now
        if encoder_hidden_states is not None and self.reuse_cross:
            v = attn.to_v(context[:1])[0].view(-1, heads, d).transpose(0, 1)  # (heads, M, d)
            out0 = attn.to_out[0](torch.bmm(probs, v).transpose(0, 1).reshape(n, channels))
            if modulate:
                m = st.modulation
                fn = kernels.modulate if self.fused_modulation else kernels.modulate_torch
                out = fn(out0, m.masks.to(out0.dtype), m.index, m.coef.to(out0.dtype))
            else:
                out = out0.expand(batch, n, channels)
        else:
            fn = kernels.shared_attention if self.fused_attention else kernels.shared_attention_torch
            out = attn.to_out[0](fn(probs, attn.to_v(context)))
            if modulate:
                out = out + modulation_term(st.modulation, out.dtype)
        return _finish(attn, attn.to_out[1](out), hidden_states)


def make_processors(unet, cls, state: RunState, **options) -> dict:
    """One `cls(layer_name, state, **options)` per attention layer, keyed as set_attn_processor wants."""
    return {k: cls(k.removesuffix(".processor"), state, **options) for k in unet.attn_processors}


@contextlib.contextmanager
def installed(unet, procs: dict):
    """Install processors on the UNet for the duration of a block; restore the originals."""
    original = unet.attn_processors
    unet.set_attn_processor(dict(procs))  # diffusers pops entries from the dict it is given
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def attention_layer_names(unet) -> list[str]:
    return [k.removesuffix(".processor") for k in unet.attn_processors]


def find_module(unet, name: str):
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} does not exist in this UNet; attention layers are e.g. "
                         f"{attention_layer_names(unet)[-3:]}") from None
