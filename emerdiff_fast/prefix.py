"""Step-0 prefix sharing (fast path): at the first denoising step every batch member has
the same input (the sampled latent at t_modulate), the same timestep and the same
context, so the whole UNet up to the modulated layer computes the same thing for every
member. It is computed once: the UNet is called with member 0 alone, and forward
pre-hooks widen the batch to all members where they first differ:

* the Transformer2DModel holding the modulated layer gets its input repeated to the full
  batch (as an expanded view; the widening cannot be later, inside the transformer,
  because that module reshapes its output with its input's batch size);
* every later up block gets its skip connections (computed at batch 1 on the way down)
  and the text context expanded likewise; the time embedding broadcasts by itself.

Exact in arithmetic: each member's values are those it would have computed. Only
diffusers' hook API is used (no forward is replaced), and the hooks read one integer,
`PrefixState.width`, so a compiled UNet sees two fixed cases (widen to B at step 0,
nothing later) and traces one graph per case. Supported when the modulated layer is in
the last attention of an up block (the authors' layer, the default); otherwise
`prefix_hooks` installs nothing and returns False.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass


@dataclass
class PrefixState:
    width: int = 0  # members to widen to at the modulated block; 0 = no widening (steps > 0)


def _widen(t, width: int):
    return t.expand(width, *t.shape[1:]) if t is not None and t.shape[0] == 1 else t


def supported(unet, modulated_layer: str) -> tuple[int, int] | None:
    """(up block, attention) index of the modulated layer if prefix sharing applies."""
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.", modulated_layer)
    if not m:
        return None
    block, attn = int(m.group(1)), int(m.group(2))
    attentions = getattr(unet.up_blocks[block], "attentions", None)
    if attentions is None or attn != len(attentions) - 1:
        return None  # a later resnet of the same block would concatenate batch-1 skips
    return block, attn


@contextlib.contextmanager
def prefix_hooks(unet, modulated_layer: str, state: PrefixState):
    """Install the widening hooks for the duration of a block; yields whether they apply."""
    where = supported(unet, modulated_layer)
    if where is None:
        yield False
        return
    block, attn = where

    def widen_input(module, args, kwargs):
        if not state.width:
            return None
        kwargs = dict(kwargs)
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = _widen(kwargs["encoder_hidden_states"], state.width)
        return (_widen(args[0], state.width), *args[1:]), kwargs

    def widen_skips(module, args, kwargs):
        if not state.width:
            return None
        kwargs = dict(kwargs)
        kwargs["res_hidden_states_tuple"] = tuple(_widen(t, state.width) for t in kwargs["res_hidden_states_tuple"])
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs["encoder_hidden_states"] = _widen(kwargs["encoder_hidden_states"], state.width)
        return args, kwargs

    handles = [unet.up_blocks[block].attentions[attn].register_forward_pre_hook(widen_input, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(widen_skips, with_kwargs=True) for b in unet.up_blocks[block + 1:]]
    try:
        yield True
    finally:
        for h in handles:
            h.remove()
