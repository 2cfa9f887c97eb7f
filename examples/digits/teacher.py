"""Train the digits teachers: class-conditional rectified-flow diffusers UNet / DiT on 16x16 digits."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from examples.digits.data import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, load_digits
from flowpress.compress.slimflow import train_step
from flowpress.errors import FlowpressError
from flowpress.models import DiffusersDenoiser, DiTSpec, UNetSpec, build_dit, build_unet, save_model
from flowpress.sampling import interpolate, target_velocity


@dataclass(frozen=True)
class TeacherConfig:
    """architecture 'unet' uses block_out_channels / attention_levels / layers_per_block;
    'dit' uses dit_layers / dit_heads / dit_head_dim / patch_size."""

    out: str = "examples/digits/checkpoints/digits-unet"
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
        UNetSpec(self.block_out_channels, self.attention_levels, self.layers_per_block)  # checks the widths
        if self.steps < 1 or self.batch_size < 1:
            raise FlowpressError(
                f"teacher.steps and teacher.batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )


def build_model(config: TeacherConfig) -> DiffusersDenoiser:
    if config.architecture == "dit":
        spec = DiTSpec(config.dit_layers, config.dit_heads, config.dit_head_dim, config.patch_size)
        return build_dit(spec, IMAGE_SHAPE, NUM_CLASSES, config.time_scale)
    unet = UNetSpec(config.block_out_channels, config.attention_levels, config.layers_per_block)
    return build_unet(unet, IMAGE_SHAPE, NUM_CLASSES, config.time_scale)


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
        v = model(interpolate(x0, eps, t), t, {"class_labels": labels})
        loss = F.mse_loss(v, target_velocity(x0, eps))
        train_step(model, ema, opt, sched, loss, config.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = save_model(ema, config.out)
    meta = json.loads((out / "flowpress.json").read_text())
    meta["training"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    meta["params"] = sum(p.numel() for p in ema.parameters())
    (out / "flowpress.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
