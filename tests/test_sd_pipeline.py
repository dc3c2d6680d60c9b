"""A loaded artifact drops into a real diffusers StableDiffusionPipeline built from configs."""

from __future__ import annotations

import torch

import fxpress
from fxpress.frontends.zoo import TINY_UNET_CONFIG


def test_pipeline_runs_with_loaded_unet(tiny_artifact):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=fxpress.load(tiny_artifact),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    dim = TINY_UNET_CONFIG["cross_attention_dim"]
    embeds = torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(1))
    image = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=3,
                 height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(2)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
