"""The performance model counts what torch's FLOP counter counts, runs in CI time, and its
variants are ordered as they must be."""
import pytest
import torch

from benchmarks.common import skeleton_path
from benchmarks.roofline import DEVICES, count, main, meta_models, report


def test_counts_match_torch_flop_counter(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet, _ = meta_models("tiny", torch.float32)
    unet.set_attn_processor(AttnProcessor())
    x = torch.empty(2, 4, 16, 16, device="meta")
    ctx = torch.empty(2, 77, unet.config.cross_attention_dim, device="meta")
    ours = count(lambda: unet(x, torch.tensor(281, device="meta"), encoder_hidden_states=ctx)).totals()["flops"]
    with torch.inference_mode(), FlopCounterMode(display=False) as m:
        unet(x, torch.tensor(281, device="meta"), encoder_hidden_states=ctx)
    assert ours == m.get_total_flops() > 0


def test_report_on_tiny_model(capsys):
    r = report("tiny", 128, 4)
    fast, ref = r["paths"]["fast"], r["paths"]["reference"]
    assert 0 < fast["tflop"] < ref["tflop"] and fast["gb_fused"] < fast["gb_eager"] < ref["gb_eager"]
    for d in DEVICES:
        assert 0 < fast["seconds"][d]["fused"] <= fast["seconds"][d]["eager"] < ref["seconds"][d]["eager"]
    assert len(r["top_ops_fast_eager_h100"]) == 10
    assert main(["--model", "tiny", "--resolution", "128", "--masks", "4"]) == 0
    assert "fast, compiled (fused)" in capsys.readouterr().out


@pytest.mark.skipif(not (skeleton_path(None) / "unet/config.json").exists(), reason="no SD 2.1-base skeleton here")
def test_full_size_unet_matches_spec_floor_table():
    from diffusers.models.attention_processor import AttnProcessor

    unet, vae = meta_models("sd21-base", torch.bfloat16)
    unet.set_attn_processor(AttnProcessor())
    x = torch.empty(1, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 77, 1024, device="meta", dtype=torch.bfloat16)
    gflop = count(lambda: unet(x, torch.tensor(281, device="meta"), encoder_hidden_states=ctx)).totals()["flops"] / 1e9
    assert abs(gflop - 803) < 2  # SPEC section 3: 803 GFLOP per batch-1 UNet call
    assert abs(count(lambda: vae.decode(x)).totals()["flops"] / 1e9 - 2515) < 2
