"""What every UNet call is conditioned on, for every model family, built in this one place.

SD 1.x/2.x UNets take the text encoder's hidden states (`encoder_hidden_states`).
SDXL-family UNets (SDXL base, SSD-1B, Vega: `addition_embed_type == "text_time"`) take the
hidden states of both text encoders, concatenated, and in `added_cond_kwargs` the second
encoder's pooled embedding (`text_embeds`) and six micro-conditioning numbers (`time_ids`:
original size, crop corner, target size). The rest of the library calls
`unet(x, t, **cond.kwargs(batch))` and never asks which family a model is.

EmerDiff and Hyperfeatures run on the empty prompt with no guidance. "Empty" is the
pipeline's own unconditional input, the negative branch diffusers builds for
classifier-free guidance: the encoded "" for SD, and for SDXL zeros where the pipeline's
`force_zeros_for_empty_prompt` says so (SDXL base) or the encoded "" through both encoders
where it does not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TIME_IDS = 6  # (original H, W, crop top, left, target H, W): SDXL base's micro-conditioning


def takes_added_conditions(unet_config) -> bool:
    """Whether the UNet needs text_embeds and time_ids (the SDXL family)."""
    return unet_config.get("addition_embed_type") == "text_time"


def time_ids(size: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning for an image processed at (H, W): original size = target
    size = the processing size, crop corner (0, 0) (what the SDXL pipeline passes by default)."""
    h, w = int(size[0]), int(size[1])
    return [h, w, 0, 0, h, w]


@dataclass(frozen=True)
class Conditioning:
    """One or more prompts as the UNet takes them (leading dimension: prompts)."""

    context: torch.Tensor                     # (n, L, D) encoder_hidden_states
    text_embeds: torch.Tensor | None = None   # (n, P) pooled text embedding (SDXL family)
    time_ids: torch.Tensor | None = None      # (n, 6) micro-conditioning (SDXL family)

    def at_size(self, size: tuple[int, int]) -> "Conditioning":
        """For images processed at (H, W): SDXL's time_ids say that size; others are unchanged."""
        if self.text_embeds is None:
            return self
        ids = torch.tensor([time_ids(size)], device=self.context.device, dtype=self.context.dtype)
        return dataclasses.replace(self, time_ids=ids.expand(self.context.shape[0], -1))

    def repeat(self, n: int) -> "Conditioning":
        """The prompts n times over, in order (p0, p1, ..., p0, p1, ...)."""
        def rep(t):
            return None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))

        return Conditioning(rep(self.context), rep(self.text_embeds), rep(self.time_ids))

    def kwargs(self, batch: int) -> dict:
        """UNet keyword arguments for `batch` members: one prompt is expanded (a view, no
        copy) to every member; n prompts must already be `batch`."""
        def fit(t):
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t

        out = {"encoder_hidden_states": fit(self.context)}
        if self.text_embeds is not None:
            if self.time_ids is None:
                raise ValueError("this model's UNet needs time_ids: call Conditioning.at_size(size) first")
            out["added_cond_kwargs"] = {"text_embeds": fit(self.text_embeds), "time_ids": fit(self.time_ids)}
        return out


def _check_time_ids(pipe, pooled_dim: int) -> None:
    """SDXL base's six micro-conditioning numbers; a UNet expecting others (the refiner's
    aesthetic score) is refused in one line rather than failing inside diffusers."""
    cfg = pipe.unet.config
    expected = (cfg.projection_class_embeddings_input_dim - pooled_dim) / cfg.addition_time_embed_dim
    if expected != TIME_IDS:
        raise ValueError(f"this UNet's text_time embedding takes {expected:g} time ids; EmerDiff supports "
                         f"the {TIME_IDS} of SDXL base (original size, crop, target size)")


def _encoded(pipe, context: torch.Tensor, pooled: torch.Tensor | None, device, dtype,
             size: tuple[int, int] | None) -> Conditioning:
    """Encoder outputs -> Conditioning on `device` in `dtype`; the pooled embedding and (at
    `size`, else later by at_size) the time ids only where the UNet takes them."""
    if not takes_added_conditions(pipe.unet.config):
        return Conditioning(context.to(device, dtype))
    _check_time_ids(pipe, pooled.shape[-1])
    cond = Conditioning(context.to(device, dtype), pooled.to(device, dtype))
    return cond.at_size(size) if size is not None else cond


def _encode_prompt(pipe, text: str, device, unconditional: bool) -> tuple:
    """(hidden states, pooled or None) of the pipeline's own encode_prompt: the prompt, or
    with `unconditional` the negative branch it builds for classifier-free guidance."""
    with torch.inference_mode():
        out = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=unconditional)
    # SD returns (prompt, negative); SDXL (prompt, negative, pooled, negative pooled)
    pooled = (out[3] if unconditional else out[2]) if len(out) == 4 else None
    return (out[1] if unconditional else out[0]), pooled


def empty_prompt(pipe, device, dtype, size: tuple[int, int] | None = None) -> Conditioning:
    """The unconditional input (see the module's docstring), in `dtype` on `device`;
    `size` (H, W): the processing size SDXL's time_ids name (else set later by at_size)."""
    return _encoded(pipe, *_encode_prompt(pipe, "", device, unconditional=True), device, dtype, size)


def prompt(pipe, text: str, device, dtype, size: tuple[int, int] | None = None) -> Conditioning:
    """A text prompt as the pipeline encodes it (no guidance), in `dtype` on `device`."""
    return _encoded(pipe, *_encode_prompt(pipe, text, device, unconditional=False), device, dtype, size)


def tokenizers(pipe) -> list:
    """The pipeline's tokenizers, one per text encoder, in encoder order."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def encode_ids(pipe, ids: list[torch.Tensor], dtype) -> Conditioning:
    """Token ids (one (n, L) tensor per tokenizer, from `tokenizers`) -> Conditioning, as the
    pipeline's encode_prompt does it: SD's last hidden state; SDXL's penultimate hidden
    states of both encoders concatenated, and the second encoder's pooled projection."""
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    encoders = [e for e in encoders if e is not None]
    with torch.inference_mode():
        if not takes_added_conditions(pipe.unet.config):
            return _encoded(pipe, encoders[0](ids[0].to(encoders[0].device))[0], None, pipe.unet.device, dtype,
                            None)
        hidden, pooled = [], None
        for encoder, part in zip(encoders, ids):
            out = encoder(part.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled projection (text_embeds)
        return _encoded(pipe, torch.cat(hidden, -1), pooled, pipe.unet.device, dtype, None)


def placeholder(unet_config, size: tuple[int, int], dtype, device="meta", tokens: int = 77) -> Conditioning:
    """A Conditioning of the right shapes for tracing and counting (memory model, roofline,
    FLOP floor): zeros on `device` (meta: no memory) for a UNet config and size (H, W)."""
    context = torch.zeros(1, tokens, unet_config["cross_attention_dim"], device=device, dtype=dtype)
    if not takes_added_conditions(unet_config):
        return Conditioning(context)
    pooled = unet_config["projection_class_embeddings_input_dim"] - TIME_IDS * unet_config["addition_time_embed_dim"]
    return Conditioning(context, torch.zeros(1, pooled, device=device, dtype=dtype),
                        torch.tensor([time_ids(size)], device=device, dtype=dtype))
