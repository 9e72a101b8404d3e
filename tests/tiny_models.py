"""Tiny random pipelines of the other supported families, for tests: an SDXL-architecture
pipeline (two text encoders, the text_time embedding, 2-block transformers at its lowest
resolution) and a v-prediction SD pipeline. Seeded; saved with save_pretrained by the tests
that load them back through --model FOLDER."""
import torch

from emerdiff_fast.loading import SD_SCHEDULER, _seeded, _tiny_tokenizer, tiny_pipeline


EULER = {**{k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}, "timestep_spacing": "leading"}  # as SDXL base


def tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64), norm_num_groups=8, attention_head_dim=(2, 2, 4),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), sample_size=128, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=_tiny_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(**EULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def tiny_v_pipeline(seed: int = 0, dtype=torch.float32):
    """The tiny SD model with a v-prediction scheduler (as SD 2.x at 768 px)."""
    from diffusers import DDPMScheduler

    pipe = tiny_pipeline(seed)
    pipe.scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type="v_prediction")
    return pipe.to(dtype=dtype)
