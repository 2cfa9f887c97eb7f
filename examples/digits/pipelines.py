"""Two diffusers pipelines trained here on the digits, saved as diffusers saves them: what a Stable
Diffusion or DDPM user recognises, small enough to commit.

- digits-ddpm: an ε-prediction DDPMPipeline (unconditional UNet2DModel + DDPMScheduler).
- digits-sd: a text-to-image latent pipeline (StableDiffusionPipeline layout): AutoencoderKL on the
  16x16 digits (4x8x8 latents), a small CLIP text encoder with a tokenizer this project writes, a
  UNet2DConditionModel with cross-attention, ε-prediction, DDIM.  Prompts such as "a bold
  handwritten seven" steer the digit and the stroke (bold / thin: the training images dilated or
  eroded).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from examples.digits.data import load_digits
from flowpress.compress.slimflow import train_step, warmup_cosine
from flowpress.extras import need

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("", "bold", "thin")
WORDS = ("a", "handwritten", *STYLES[1:], *DIGIT_WORDS)


def prompt_for(label: int, style: str = "") -> str:
    return " ".join(w for w in ("a", style, "handwritten", DIGIT_WORDS[label]) if w)


def label_of(prompt: str) -> int | None:
    """The digit a prompt asks for (None when it names none)."""
    found = [i for i, word in enumerate(DIGIT_WORDS) if re.search(rf"\b{word}\b", prompt)]
    return found[0] if len(found) == 1 else None


def styled(images: Tensor, style: str) -> Tensor:
    """images in [-1, 1]: bold = strokes dilated (3x3 max), thin = eroded (3x3 min)."""
    if style == "bold":
        return F.max_pool2d(images, 3, 1, 1)
    if style == "thin":
        return -F.max_pool2d(-images, 3, 1, 1)
    return images


def word_tokenizer(folder: Path, words: tuple[str, ...], max_length: int) -> Any:
    """A CLIP tokenizer with one token per word of `words`, written into `folder` as vocab.json +
    merges.txt (transformers' CLIPTokenizer)."""
    need("transformers", "text", "the digits text pipelines")
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    merges = ["#version: 0.2"]
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:  # merge left to right so the whole word becomes one token
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    vae_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    seed: int = 0


def _ema_train(model: torch.nn.Module, loss_fn, config: TrainConfig, desc: str, progress: bool) -> torch.nn.Module:  # noqa: ANN001
    import copy

    from tqdm import tqdm

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, config.steps))
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = loss_fn(model, gen)
        train_step(model, ema, opt, sched, loss, config.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def train_ddpm(out: Path, config: TrainConfig, progress: bool = True) -> Path:
    """digits-ddpm: an unconditional ε-prediction UNet2DModel under DDPM's linear schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(config.seed)
    images = load_digits("all").images
    unet: Any = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
    )  # fmt: skip
    scheduler: Any = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")

    def loss_fn(model: torch.nn.Module, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(images), (config.batch_size,), generator=gen)
        x0 = images[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (config.batch_size,), generator=gen)
        return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)

    ema = _ema_train(unet.train(), loss_fn, config, "digits-ddpm", progress)
    pipe: Any = DDPMPipeline(unet=ema, scheduler=scheduler)
    pipe.save_pretrained(out)
    return out


def train_sd(out: Path, config: TrainConfig, progress: bool = True) -> Path:
    """digits-sd: VAE first (reconstruction + a light KL), then the text-conditioned UNet on its
    latents with a frozen random CLIP text encoder (10% of prompts dropped to "" for guidance)."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    need("transformers", "text", "the digits text pipelines")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    data = load_digits("all")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_tokenizer(Path(tmp), WORDS, max_length=8)
    text_encoder: Any = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    ).eval().requires_grad_(False)  # fmt: skip
    vae: Any = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=16,
    )  # fmt: skip

    def vae_loss(model: Any, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(data.labels), (config.batch_size,), generator=gen)
        style = STYLES[int(torch.randint(0, 3, (1,), generator=gen))]
        x = styled(data.images[index], style)
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    vae_config = TrainConfig(**{**config.__dict__, "steps": config.vae_steps})
    vae = _ema_train(vae.train(), vae_loss, vae_config, "digits-sd vae", progress)
    with torch.no_grad():
        latents = vae.encode(data.images).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    scaling = vae.config.scaling_factor

    def embed(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state

    unet: Any = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    scheduler: Any = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip

    def unet_loss(model: torch.nn.Module, gen: torch.Generator) -> Tensor:
        index = torch.randint(0, len(data.labels), (config.batch_size,), generator=gen)
        styles = torch.randint(0, 3, (config.batch_size,), generator=gen).tolist()
        x = torch.cat([styled(data.images[i : i + 1], STYLES[s]) for i, s in zip(index.tolist(), styles, strict=True)])
        prompts = [prompt_for(int(data.labels[i]), STYLES[s]) for i, s in zip(index.tolist(), styles, strict=True)]
        drop = torch.rand(config.batch_size, generator=gen) < config.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample(generator=gen) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (config.batch_size,), generator=gen)
        return F.mse_loss(
            model(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=embed(prompts)).sample, noise
        )

    unet = _ema_train(unet.train(), unet_loss, config, "digits-sd unet", progress)
    pipe: Any = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out)
    return out
