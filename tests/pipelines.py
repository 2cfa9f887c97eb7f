"""Tiny random-weight diffusers pipelines of every family flowpress supports, built offline and
saved as diffusers saves them (model_index.json + components): the test inputs of `--model`."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.digits.pipelines import word_tokenizer

WORDS = ("a", "photo", "of", "the", "red", "green", "car", "dog", "cat", "tree", "on", "street", "zero", "seven")


def tiny_tokenizer(folder: Path, max_length: int = 16):  # noqa: ANN201 - transformers' CLIPTokenizer
    """A CLIP tokenizer over a dozen words (each word one token)."""
    return word_tokenizer(folder, WORDS, max_length)


def tiny_clip(vocab_size: int, hidden: int = 32, projection: bool = False):  # noqa: ANN201
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(latent_channels: int = 4, shift: float | None = None):  # noqa: ANN201
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=shift,
    ).eval()


def ddpm_pipeline(folder: Path, prediction_type: str = "epsilon", class_conditional: bool = False) -> Path:
    """UNet2DModel (1x8x8, unconditional or 10 classes) + DDPMScheduler: the google/ddpm-* layout."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=11 if class_conditional else None,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def sd_pipeline(folder: Path) -> Path:
    """Stable-Diffusion layout: UNet2DConditionModel (4x8x8 latents, cross-attention on a tiny
    CLIP), AutoencoderKL (16x16 RGB), DDIM, the tokenizer and text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / ".tokenizer")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def dit_pipeline(folder: Path) -> Path:
    """DiT layout: DiTTransformer2DModel (4x8x8 latents, learned variance, 1000 classes: DiTPipeline's
    null class is 1000) + VAE + DDIM; the first ten classes are named after digits."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    labels = {
        i: name
        for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    }
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=labels).save_pretrained(
        folder
    )
    return folder


def sd3_pipeline(folder: Path) -> Path:
    """SD3 layout: SD3Transformer2DModel (16x8x8 latents) on two tiny CLIPs (no T5), FlowMatchEuler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / ".tokenizer")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(16, shift=0.0609),
        text_encoder=tiny_clip(len(tokenizer), projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip(len(tokenizer), projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return folder


def pixart_pipeline(folder: Path) -> Path:
    """PixArt layout: PixArtTransformer2DModel (4x8x8 latents, learned variance) on a tiny T5 encoder
    (with the tiny CLIP tokenizer), DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / ".tokenizer", max_length=120)
    encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, pad_token_id=1)
    ).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        norm_num_groups=8,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def flux_pipeline(folder: Path) -> Path:
    """Flux layout: FluxTransformer2DModel (one double and one single block, guidance embedding,
    4x8x8 latents packed in 2x2 patches) on a tiny CLIP and a tiny T5 (the tiny CLIP tokenizer for
    both), FlowMatchEuler with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder / ".tokenizer")
    t5_tokenizer = tiny_tokenizer(folder / ".tokenizer-t5", max_length=32)
    encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, pad_token_id=1)
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(4, shift=0.1159),
        text_encoder=tiny_clip(len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=encoder,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder
