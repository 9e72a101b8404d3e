"""What a backend needs to compute one image's difference maps, built by the segmenter and
passed down (segmenter -> backend -> sampling loop -> attention processors): the backends
read this object and their arguments, never the segmenter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .conditioning import Conditioning


class Progress:
    """A per-image tqdm bar over a backend's units of work (UNet steps x chunks and decode
    calls), or nothing. Host-side counters only: a tick never syncs the device."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._bar = None

    def begin(self, total: int, desc: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def tick(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass(frozen=True)
class Run:
    """The models as called, the method's settings and the batch sizes of one image's runs."""

    unet: torch.nn.Module                         # processors and hooks are installed on it
    unet_call: Callable                           # what the loop calls: the UNet or its compiled form
    decode: Callable[[torch.Tensor], torch.Tensor]  # scaled final latents -> images in [-1, 1]
    static_decode: bool                           # decode calls must keep one batch (a compiled decode)
    cond: Conditioning                            # the empty prompt at this image's size, model dtype
    dtype: torch.dtype                            # the UNet's
    device: torch.device
    lam: float
    modulated_layer: str
    modulate_steps: int
    chunk: int                                    # modulated runs per UNet call (2: one +/- pair)
    decode_batch: int                             # images per decode call
    progress: Progress
