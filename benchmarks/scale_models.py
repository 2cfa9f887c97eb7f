"""Full-width diffusers pipelines of the field's architectures, built from their published
configs with random weights (no weights can be downloaded here), saved as diffusers saves them.

Every parameter-size path is the real one; the latent size is small (`latent` px) so CPU
compute stays small.  Text encoders are full size; their tokenizers are a few words (token ids
are far below the encoders' vocabularies)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from examples.digits.pipelines import word_tokenizer
from flowpress.extras import need

WORDS = ("a", "photo", "of", "the", "red", "green", "car", "dog", "cat", "tree", "on", "street", "house", "sky")


def _tokenizer(folder: Path, max_length: int = 77):  # noqa: ANN202
    return word_tokenizer(folder, WORDS, max_length)


def _clip(hidden: int, layers: int, heads: int, act: str, projection: bool):  # noqa: ANN202
    need("transformers", "text", "the scale models' text encoders")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _clip_l(projection: bool = False):  # noqa: ANN202
    """CLIP ViT-L/14's text tower (SD 1.5, SDXL's first encoder, SD3): 123M parameters."""
    return _clip(768, 12, 12, "quick_gelu", projection)


def _clip_bigg():  # noqa: ANN202
    """OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, SD3): 695M parameters."""
    return _clip(1280, 32, 20, "gelu", projection=True)


def _vae(latent_channels: int = 4, scaling: float = 0.18215, shift: float | None = None, size: int = 32):  # noqa: ANN202
    """The SD VAE (83M parameters), or SD3's / Flux's with 16 latent channels; size: its image side
    (Flux's pipeline samples at the VAE's)."""
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        scaling_factor=scaling,
        shift_factor=shift,
        sample_size=size,
    )
    return vae.eval()


def _sd_scheduler():  # noqa: ANN202
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd15(folder: Path, latent: int = 16) -> Path:
    """Stable Diffusion 1.5: UNet2DConditionModel (860M), CLIP ViT-L/14 text, SD VAE, DDIM."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
    pipe: Any = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip_l(),
        tokenizer=_tokenizer(folder / ".tokenizer"),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def sdxl(folder: Path, latent: int = 16) -> Path:
    """SDXL base: UNet2DConditionModel (2.6B, text_time added conditioning), CLIP-L + bigG, SD VAE."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=latent,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    tokenizer = _tokenizer(folder / ".tokenizer")
    pipe: Any = StableDiffusionXLPipeline(
        vae=_vae(scaling=0.13025),
        text_encoder=_clip_l(),
        text_encoder_2=_clip_bigg(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def pixart_alpha(folder: Path, latent: int = 16) -> Path:
    """PixArt-α: PixArtTransformer2DModel (611M, 28 layers of 1152), T5 encoder at reduced depth
    (T5-XXL's width, 2 of its 24 layers: the encoder runs once per prompt), DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    need("transformers", "text", "the scale models' text encoders")
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer(folder / ".tokenizer", max_length=120)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=2,
            num_heads=64,
            pad_token_id=1,
            feed_forward_proj="gated-gelu",
        )  # fmt: skip
    ).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=latent,
        num_layers=28,
        attention_head_dim=72,
        num_attention_heads=16,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    pipe: Any = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=_vae(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def sd3_medium(folder: Path, latent: int = 16) -> Path:
    """SD3-medium: SD3Transformer2DModel (2B, 24 layers of 1536), CLIP-L + bigG (no T5), 16-channel
    VAE, FlowMatchEuler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _tokenizer(folder / ".tokenizer")
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling=1.5305, shift=0.0609),
        text_encoder=_clip_l(projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_bigg(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return folder


def flux_dev(folder: Path, latent: int = 16) -> Path:
    """FLUX.1-dev's width at reduced depth: FluxTransformer2DModel (3072 wide, 24 heads of 128,
    guidance embedding) with 1 of its 19 double blocks and 1 of its 38 single blocks; CLIP-L and a
    T5 of T5-XXL's width (1 of its 24 layers); the 16-channel VAE; FlowMatchEuler with dynamic
    shifting, as the published configs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    need("transformers", "text", "the scale models' text encoders")
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer(folder / ".tokenizer")
    t5_tokenizer = _tokenizer(folder / ".tokenizer-t5", max_length=512)
    encoder = T5EncoderModel(
        T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, pad_token_id=1,
                 feed_forward_proj="gated-gelu")
    ).eval()  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe: Any = FluxPipeline(
        scheduler=scheduler, vae=_vae(16, scaling=0.3611, shift=0.1159, size=8 * latent), text_encoder=_clip_l(),
        tokenizer=tokenizer, text_encoder_2=encoder, tokenizer_2=t5_tokenizer, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "sd15": sd15,
    "sdxl": sdxl,
    "pixart-alpha": pixart_alpha,
    "sd3-medium": sd3_medium,
    "flux-dev-depth2": flux_dev,
}


def build(name: str, folder: Path, latent: int = 16, seed: int = 0) -> Path:
    """The `name` pipeline in `folder` (built once: a finished folder has model_index.json)."""
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    with torch.no_grad():
        return BUILDERS[name](folder, latent)
