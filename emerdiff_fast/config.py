"""EmerDiff hyperparameters (SPEC section 1), validated on construction."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

_LAYER_RE = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]$")


class ConfigError(ValueError):
    """A hyperparameter is out of range or inconsistent."""


class FromModelStr(str):
    """A default that follows the model: equal to the value shown (SD's), replaced by the
    model's own in EmerDiffConfig.for_model. A value the user passes is a plain str/int."""

    follows_model = True


class FromModelInt(int):
    follows_model = True  # (FromModelStr's docstring)


def follows_model(value) -> bool:
    return getattr(value, "follows_model", False)


@dataclass(frozen=True)
class EmerDiffConfig:
    """Every knob of the method. Defaults are the paper's, or where its text is silent the
    authors' public notebook's (SPEC section 1); (choice) marks our documented picks."""

    num_masks: int = 30                 # K; the paper sweeps 10..40
    lam: float = 10.0                   # modulation strength lambda
    t_feature: int = 1                  # timestep of the low-resolution feature run
    feature_samples: int = 8            # (choice) noise draws whose queries are averaged (notebook: 100)
    t_modulate: int = FromModelInt(281)  # timestep where modulated runs start; by default the step of
                                        # the checkpoint's grid nearest 281 (SD's grid has 281 itself)
    num_inference_steps: int = 50       # the checkpoint's grid (SD: 981, 961, ..., 1); coarser: faster, less exact
    # to_q output, and the layer that gets + c * M_i; by default the model's own (default_layers),
    # SD's shown; a layer named by the user is used as named
    feature_layer: str = FromModelStr("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    modulated_layer: str = FromModelStr("up_blocks.1.attentions.2.transformer_blocks.0.attn2")
    modulate_steps: int = 1             # modulate at the first N steps from t_modulate (authors: 1)
    gaussian_sigma: float = 0.0         # extra smoothing of d_i before argmax, px; 0 = none (authors)
    kmeans_init: str = "k-means++"      # the only initialisation implemented
    kmeans_restarts: int = 10           # (choice) keep the restart with the lowest inertia
    kmeans_iterations: int = 100        # (choice) Lloyd iterations at most
    seed: int = 0
    resolution: int = FromModelInt(512)  # by default the model's own (model_resolution: SD 1.x and
                                        # 2.x-base 512 as shown, SDXL 1024); images are resized to
                                        # resolution x resolution, or with
    keep_aspect: bool = False           # to about resolution^2 pixels, aspect ratio kept, each side
                                        # rounded up to the model's multiple (64 for SD; the notebook's
                                        # load_img(resize_to_512=False); its example squashes, as default)
    decode_dtype: str | None = None     # approximate: VAE decode in this dtype (None: the model's)
    decode_scale: float = 1.0           # approximate: 0.5 decodes 2x-downsampled latents (maps upsampled)

    def __post_init__(self) -> None:
        if self.num_masks < 2:
            raise ConfigError(f"num_masks must be at least 2, got {self.num_masks}")
        if self.resolution <= 0 or self.resolution % 64:
            raise ConfigError(f"resolution must be a positive multiple of 64, got {self.resolution}")
        if not (self.lam == self.lam) or abs(self.lam) == float("inf"):
            raise ConfigError(f"lam must be finite, got {self.lam}")
        if self.num_inference_steps < 1 or 1000 % self.num_inference_steps:
            raise ConfigError(f"num_inference_steps must divide 1000, got {self.num_inference_steps}")
        # on the checkpoint's own grid, and modulate_steps within it: sampling.ReverseSchedule.build
        if not 0 < self.t_modulate < 1000:
            raise ConfigError(f"t_modulate must lie in (0, 1000), got {self.t_modulate}")
        if not 0 <= self.t_feature < 1000:
            raise ConfigError(f"t_feature must lie in [0, 1000), got {self.t_feature}")
        if self.modulate_steps < 1:
            raise ConfigError(f"modulate_steps must be at least 1, got {self.modulate_steps}")
        for field in ("feature_layer", "modulated_layer"):
            name = getattr(self, field)
            if not _LAYER_RE.match(name):
                raise ConfigError(
                    f"unknown layer name {field}={name!r}; expected e.g. "
                    "'up_blocks.1.attentions.2.transformer_blocks.0.attn2'")
        if self.feature_samples < 1:
            raise ConfigError(f"feature_samples must be at least 1, got {self.feature_samples}")
        if self.gaussian_sigma < 0:
            raise ConfigError(f"gaussian_sigma must be >= 0, got {self.gaussian_sigma}")
        if self.kmeans_init != "k-means++":
            raise ConfigError(f"kmeans_init must be 'k-means++', got {self.kmeans_init!r}")
        if self.kmeans_restarts < 1 or self.kmeans_iterations < 1:
            raise ConfigError("kmeans_restarts and kmeans_iterations must be at least 1")
        if self.decode_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"decode_dtype must be float32, bfloat16, float16 or None, got {self.decode_dtype!r}")
        if self.decode_scale not in (1.0, 0.5):
            raise ConfigError(f"decode_scale must be 1.0 or 0.5, got {self.decode_scale}")

    def for_model(self, unet, vae_config) -> "EmerDiffConfig":
        """This config with the defaults that follow the model taken from it: resolution
        (model_resolution) and the layers (default_layers). Values the user gave stay, and
        on SD 1.x/2.x-base the model's own are the defaults shown."""
        feature, modulated = default_layers(unet)
        own = {"resolution": model_resolution(unet.config, vae_config), "feature_layer": feature,
               "modulated_layer": modulated}
        return self.replace(**{k: v for k, v in own.items() if follows_model(getattr(self, k))})

    @property
    def approximate(self) -> bool:
        """Whether this config leaves the exact method (a speed preset's changes)."""
        return (self.num_inference_steps != 50 or self.decode_dtype is not None or self.decode_scale != 1.0)

    def check_grid(self, grid: tuple[int, int], size: tuple[int, int] | None = None) -> None:
        """K must not exceed the feature layer's positions (the model decides the grid);
        size: the (H, W) processing size when it is not resolution x resolution."""
        if self.num_masks > grid[0] * grid[1]:
            where = f"{size[1]}x{size[0]} (W x H)" if size else f"resolution {self.resolution}"
            raise ConfigError(
                f"num_masks={self.num_masks} exceeds the {grid[0] * grid[1]} low-resolution positions "
                f"at {where} (feature grid {grid[0]}x{grid[1]})")

    def replace(self, **changes) -> "EmerDiffConfig":
        return dataclasses.replace(self, **changes)

    def with_preset(self, name: str) -> "EmerDiffConfig":
        """This config with a speed preset applied (SPEED_PRESETS; "exact" changes nothing)."""
        if name not in SPEED_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(SPEED_PRESETS)}")
        return self.replace(**SPEED_PRESETS[name])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def vae_scale_factor(vae_config) -> int:
    """Image pixels per latent position (8 for SD: one downsampling per encoder block but the last)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def model_resolution(unet_config, vae_config) -> int:
    """The image size a model was trained at: its UNet's sample size times the VAE factor
    (SD 1.x and 2.x-base 64 x 8 = 512, SD 2.x 768, SDXL 128 x 8 = 1024)."""
    return int(unet_config["sample_size"]) * vae_scale_factor(vae_config)


def default_layers(unet) -> tuple[str, str]:
    """(feature layer, modulated layer) from the UNet's own structure, one rule for every
    model: in the lowest-resolution up block that has cross-attention, the first
    cross-attention of its first attention gives the features and the first cross-attention
    of its last attention is modulated. SD 1.x/2.x: up_blocks.1 (1/32 of the image),
    attentions 0 and 2, the authors' layers. SDXL: up_blocks.0 (also 1/32), attentions 0
    and 2; SSD-1B and Vega, SDXL's blocks with fewer transformers in each attention, the
    same. Attentions without transformer blocks are passed over."""
    for i, block in enumerate(unet.up_blocks):  # diffusers orders up blocks lowest resolution first
        attentions = [j for j, a in enumerate(getattr(block, "attentions", None) or [])
                      if len(getattr(a, "transformer_blocks", ())) and getattr(a.transformer_blocks[0], "attn2", None)]
        if attentions:
            return tuple(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2"
                         for j in (attentions[0], attentions[-1]))
    raise ConfigError("this UNet has no up block with cross-attention: give feature_layer and modulated_layer")


def layer_scale(unet_config, layer: str) -> int:
    """Latent positions per position of an attention layer: down_blocks.i runs at 1/2^i,
    the mid block at the lowest level, up_blocks.i at 1/2^(L-1-i) for L levels (SD's
    up_blocks.1 at 1/4 of the latent: 16x16 at 512 px; the mini model's at 8x8 at 64 px)."""
    levels = len(unet_config["block_out_channels"])
    block, _, rest = layer.partition(".")
    if block == "mid_block":
        return 2 ** (levels - 1)
    index = int(rest.split(".")[0])
    return 2 ** index if block == "down_blocks" else 2 ** (levels - 1 - index)


def size_multiple(unet_config, vae_config) -> int:
    """Image sides must be multiples of this: the VAE's factor times the UNet's
    downsamplings (64 for SD: 8 x 2^3; 16 for the mini model)."""
    return vae_scale_factor(vae_config) * 2 ** (len(unet_config["block_out_channels"]) - 1)


def layer_grid(unet_config, vae_config, size: tuple[int, int], layer: str) -> tuple[int, int]:
    """(h, w) positions of `layer` for an image of size (H, W) pixels."""
    f = vae_scale_factor(vae_config) * layer_scale(unet_config, layer)
    return size[0] // f, size[1] // f


# Speed presets (approximate, off by default): each trades fidelity to the exact method for
# time. Label agreement with the exact path on the mini model's held-out scenes at its own
# settings (benchmarks/quality.py): grid25 90%, decode-fast 86%, fastest 81%; real SD unmeasured.
SPEED_PRESETS = {
    "exact": {},
    "grid25": {"num_inference_steps": 25},                       # 8 steps from t = 281 instead of 15
    "decode-fast": {"decode_dtype": "bfloat16", "decode_scale": 0.5},  # ~4x cheaper decodes, in bf16
    "fastest": {"num_inference_steps": 25, "decode_dtype": "bfloat16", "decode_scale": 0.5},
}
