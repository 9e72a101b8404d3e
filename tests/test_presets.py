"""Speed presets: approximate by construction, validated, announced, and runnable."""
import numpy as np
import pytest

from emerdiff_fast import EmerDiff, EmerDiffConfig
from emerdiff_fast.config import SPEED_PRESETS, ConfigError

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_presets_change_only_what_they_say():
    base = EmerDiffConfig(num_masks=4, resolution=128)
    assert base.with_preset("exact") == base and not base.approximate
    g = base.with_preset("grid25")
    assert g.num_inference_steps == 25 and g.approximate and g.replace(num_inference_steps=50) == base
    assert base.with_preset("fastest").decode_scale == 0.5
    with pytest.raises(ConfigError, match="unknown preset"):
        base.with_preset("turbo")
    with pytest.raises(ConfigError, match="decode_scale"):
        EmerDiffConfig(decode_scale=0.25)
    with pytest.raises(ConfigError, match="decode_dtype"):
        EmerDiffConfig(decode_dtype="int8")
    assert set(SPEED_PRESETS) == {"exact", "grid25", "decode-fast", "fastest"}


@pytest.mark.parametrize("name", ["grid25", "decode-fast"])
def test_presets_run_and_warn(tiny_pipe, rand_image, our_log, name):
    cfg = EmerDiffConfig(num_masks=3, resolution=64, feature_samples=1).with_preset(name)
    seg = EmerDiff(tiny_pipe, cfg)
    r = seg(rand_image(0, 50, 60))
    assert r.labels.shape == (50, 60) and np.isfinite(r.difference_maps).all()
    assert r.difference_maps.shape == (3, 64, 64)
    assert any("Label agreement with the exact method, measured on the mini model only" in m.getMessage()
               for m in our_log.records)  # the issue-17 measurement, replacing "unmeasured"
    if name == "grid25":
        assert len(seg.schedule.timesteps) == 8  # 281, 241, ..., 1 instead of 15 steps
    else:
        assert seg.decode_vae is not tiny_pipe.vae and str(seg.decode_vae.dtype) == "torch.bfloat16"
