"""Train the default teacher: a class-conditional rectified-flow diffusers UNet on digits."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from models.digits import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, load_digits
from models.velocity import DiffusersVelocity, save_model
from sampling import FlowpressError, interpolate, target_velocity


@dataclass(frozen=True)
class TeacherConfig:
    """architecture 'unet' uses block_out_channels / attention_levels / layers_per_block;
    'dit' uses dit_layers / dit_heads / dit_head_dim / patch_size."""

    out: str = "checkpoints/digits-unet"
    architecture: Literal["unet", "dit"] = "unet"
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[int, ...] = (1,)
    layers_per_block: int = 2
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 32
    patch_size: int = 2
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    time_scale: float = 1000.0
    seed: int = 0
    eval_samples: int = 500  # the bar: samples from eval_steps Euler steps recognised as their class
    eval_steps: int = 20
    eval_guidance: float = 2.0

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c % 8 for c in self.block_out_channels):
            raise FlowpressError(
                f"teacher.block_out_channels must be multiples of 8 (GroupNorm groups), got {list(self.block_out_channels)}"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise FlowpressError(
                f"teacher.steps and teacher.batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )


def build_model(config: TeacherConfig) -> DiffusersVelocity:
    if config.architecture == "dit":
        return build_dit(config)
    return build_unet(config)


def build_dit(config: TeacherConfig) -> DiffusersVelocity:
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(
        num_attention_heads=config.dit_heads,
        attention_head_dim=config.dit_head_dim,
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        num_layers=config.dit_layers,
        sample_size=IMAGE_SHAPE[1],
        patch_size=config.patch_size,
        num_embeds_ada_norm=NUM_CLASSES,  # the label table gets a null row at index NUM_CLASSES
        norm_type="ada_norm_zero",
    )
    return DiffusersVelocity(dit, config.time_scale, NULL_LABEL)


def build_unet(config: TeacherConfig) -> DiffusersVelocity:
    from diffusers import UNet2DModel

    levels = range(len(config.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if b.startswith("Attn") else "UpBlock2D" for b in reversed(down))
    unet = UNet2DModel(
        sample_size=IMAGE_SHAPE[1],
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=NUM_CLASSES + 1,
        norm_num_groups=8,
        attention_head_dim=min(32, min(config.block_out_channels)),
    )
    return DiffusersVelocity(unet, config.time_scale, NULL_LABEL)


def train_teacher(config: TeacherConfig, progress: bool = True) -> Path:
    """Rectified-flow training (x_t = (1-t) x0 + t eps, v = eps - x0) with label dropout for CFG."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = load_digits("all")
    model = build_model(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + torch.cos(torch.tensor(progress_frac * torch.pi)).item()) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = len(data.labels)
    bar = tqdm(range(config.steps), desc="teacher", disable=not progress)
    for _ in bar:
        index = torch.randint(0, n, (config.batch_size,), generator=gen)
        x0, labels = data.images[index], data.labels[index].clone()
        drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout
        labels[drop] = NULL_LABEL  # DiT's label embedding also drops 10% itself in train mode
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(config.batch_size, generator=gen)
        loss = F.mse_loss(model(interpolate(x0, eps, t), t, labels), target_velocity(x0, eps))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = save_model(ema, config.out)
    meta = json.loads((out / "flowpress.json").read_text())
    meta["training"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    meta["params"] = sum(p.numel() for p in ema.parameters())
    (out / "flowpress.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
