import pytest

from emerdiff_fast import ConfigError, EmerDiff, EmerDiffConfig


def test_defaults_are_the_papers():
    c = EmerDiffConfig()
    assert (c.num_masks, c.lam, c.t_feature, c.t_modulate, c.num_inference_steps, c.resolution) == (30, 10.0, 1, 281, 50, 512)
    assert (c.modulate_steps, c.gaussian_sigma) == (1, 0.0)  # the authors': modulate at t_m only, no extra smoothing
    assert c.modulated_layer == "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    assert c.feature_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_masks=1), "at least 2"),
    (dict(t_modulate=1000), r"t_modulate must lie in \(0, 1000\)"),
    (dict(resolution=500), "multiple of 64"),
    (dict(modulated_layer="up_blocks.1.attn9"), "unknown layer name"),
    (dict(feature_samples=0), "feature_samples"),
    (dict(lam=float("nan")), "finite"),
    (dict(modulate_steps=0), "modulate_steps"),
    (dict(gaussian_sigma=-1), "gaussian_sigma"),
])
def test_invalid_configs_fail_clearly(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        EmerDiffConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_masks=257), "exceeds the 256"),
    (dict(num_masks=17, resolution=128), "exceeds the 16"),
])
def test_masks_beyond_the_models_feature_grid(tiny_pipe, kwargs, words):
    # the grid comes from the model (the tiny model has SD's 1/32 scale at up_blocks.1)
    with pytest.raises(ConfigError, match=words):
        EmerDiff(tiny_pipe, EmerDiffConfig(**kwargs))


def test_feature_and_modulated_layers_of_different_resolutions_are_refused(tiny_pipe):
    cfg = EmerDiffConfig(resolution=128, num_masks=4,
                         modulated_layer="up_blocks.2.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(ConfigError, match="runs at 4x4 but modulated_layer up_blocks.2.*at 8x8"):
        EmerDiff(tiny_pipe, cfg)


def test_layer_missing_from_model(tiny_pipe):
    cfg = EmerDiffConfig(resolution=128, num_masks=4, modulated_layer="up_blocks.3.attentions.7.transformer_blocks.0.attn2")
    with pytest.raises(ValueError, match="does not exist in this UNet"):
        EmerDiff(tiny_pipe, cfg)


def test_unknown_backend(tiny_pipe):
    with pytest.raises(ValueError, match="backend"):
        EmerDiff(tiny_pipe, EmerDiffConfig(resolution=128, num_masks=4), backend="turbo")
