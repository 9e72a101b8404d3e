"""The aggregation network (the authors' archs/aggregation_network.py, written anew): one
bottleneck block per layer, shared across timesteps, projects that layer's features to
`projection_dim` channels (384); a softmax over one learnable weight per (timestep, layer)
(132 for all steps, 12 for one step) mixes the projections into the hyperfeature map.
Inputs are resized to `output_resolution` (64) right before their bottleneck, so the
stored features stay small (extract.py). The temperature of the training loss is fixed at
0.07 (theirs: logit_scale = log(1 / 0.07), not a parameter). Saved as safetensors with
its config in the metadata.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .extract import Features, resize_to

TEMPERATURE = 0.07


def _groups(channels: int, wanted: int) -> int:
    """GroupNorm groups: `wanted` (32) when it divides the channels, else the largest that does
    (only the tiny test model needs this)."""
    return math.gcd(channels, wanted)


class Bottleneck(nn.Module):
    """detectron2's BottleneckBlock with GroupNorm, stride 1: 1x1 -> 3x3 -> 1x1 convolutions
    (bias-free, each followed by GN; ReLU after the first two and after the sum), a 1x1
    projection shortcut when the channel count changes; MSRA (fan-out) initialisation."""

    def __init__(self, cin: int, cout: int, bottleneck: int, groups: int = 32):
        super().__init__()

        def conv_gn(a, b, k):
            conv = nn.Conv2d(a, b, k, padding=k // 2, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            return nn.Sequential(conv, nn.GroupNorm(_groups(b, groups), b))

        self.conv1, self.conv2 = conv_gn(cin, bottleneck, 1), conv_gn(bottleneck, bottleneck, 3)
        self.conv3 = conv_gn(bottleneck, cout, 1)
        self.shortcut = conv_gn(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y))
        return F.relu(self.conv3(y) + self.shortcut(x))


@dataclass(frozen=True)
class AggregationConfig:
    feature_dims: tuple[int, ...]
    num_timesteps: int          # saved timesteps S (11 all steps, 1 one step)
    projection_dim: int = 384
    num_norm_groups: int = 32
    output_resolution: int = 64


class AggregationNetwork(nn.Module):
    def __init__(self, config: AggregationConfig):
        super().__init__()
        self.config = config
        p = config.projection_dim
        self.bottlenecks = nn.ModuleList(Bottleneck(d, p, p // 4, config.num_norm_groups) for d in config.feature_dims)
        # timestep-major, as theirs: weight i belongs to timestep i // L, layer i % L
        self.mixing_weights = nn.Parameter(torch.ones(config.num_timesteps * len(config.feature_dims)))

    def mixing(self) -> torch.Tensor:
        """(S, L) softmax-normalised weights."""
        return torch.softmax(self.mixing_weights, 0).view(self.config.num_timesteps, -1)

    def forward(self, feats: Features | list[torch.Tensor]) -> torch.Tensor:
        """Per-layer features (B, S, C_l, h_l, w_l) -> hyperfeatures (B, P, R, R), float32.
        Each layer's S timesteps go through its bottleneck as one batch (GroupNorm
        normalises each sample alone, so this equals S separate calls, in 1/S the launches)."""
        maps = feats.maps if isinstance(feats, Features) else feats
        w = self.mixing()
        out = None
        for layer, block in enumerate(self.bottlenecks):
            x = maps[layer].float()
            b, s = x.shape[:2]
            y = block(resize_to(x.flatten(0, 1), self.config.output_resolution))
            y = torch.einsum("bsprc,s->bprc", y.unflatten(0, (b, s)), w[:, layer])
            out = y if out is None else out + y
        return out

    def single_layer(self, feats: Features, layer: int, timestep: int = 0) -> torch.Tensor:
        """The baseline descriptor of one layer at one timestep: its projection alone."""
        x = resize_to(feats.maps[layer][:, timestep].float(), self.config.output_resolution)
        return self.bottlenecks[layer](x)

    def save(self, path) -> None:
        from safetensors.torch import save

        from ..output import atomic_write

        atomic_write(Path(path), save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                                      metadata={"config": json.dumps(asdict(self.config))}))

    @classmethod
    def load(cls, path, device="cpu") -> "AggregationNetwork":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            cfg = json.loads(f.metadata()["config"])
        cfg["feature_dims"] = tuple(cfg["feature_dims"])
        net = cls(AggregationConfig(**cfg))
        net.load_state_dict(load_file(str(path), device=str(device)))
        return net.to(device)
