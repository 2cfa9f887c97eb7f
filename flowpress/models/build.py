"""Small diffusers denoisers from a few numbers: teachers, students and test models."""

from __future__ import annotations

from dataclasses import dataclass

from flowpress.errors import FlowpressError
from flowpress.models.velocity import DiffusersDenoiser


@dataclass(frozen=True)
class UNetSpec:
    """A class-conditional UNet2DModel: one down/up level per entry of block_out_channels, attention
    at the levels listed."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[int, ...] = (1,)
    layers_per_block: int = 2

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c % 8 for c in self.block_out_channels):
            raise FlowpressError(
                f"block_out_channels must be multiples of 8 (GroupNorm groups), got {list(self.block_out_channels)}"
            )


@dataclass(frozen=True)
class DiTSpec:
    """A class-conditional DiTTransformer2DModel (adaLN-zero)."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2


def build_unet(
    spec: UNetSpec, sample_shape: tuple[int, int, int], num_classes: int, time_scale: float = 1000.0
) -> DiffusersDenoiser:
    """Random weights; class ids 0..num_classes-1 plus a null class num_classes for guidance."""
    from diffusers import UNet2DModel

    levels = range(len(spec.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if b.startswith("Attn") else "UpBlock2D" for b in reversed(down))
    channels, size, _ = sample_shape
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_classes + 1,
        norm_num_groups=8,
        attention_head_dim=min(32, min(spec.block_out_channels)),
    )
    return DiffusersDenoiser(unet, time_scale, num_classes)


def build_dit(
    spec: DiTSpec, sample_shape: tuple[int, int, int], num_classes: int, time_scale: float = 1000.0
) -> DiffusersDenoiser:
    """Random weights; DiT's label table gets its null row at index num_classes itself."""
    from diffusers import DiTTransformer2DModel

    channels, size, _ = sample_shape
    dit = DiTTransformer2DModel(
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=spec.layers,
        sample_size=size,
        patch_size=spec.patch_size,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
    return DiffusersDenoiser(dit, time_scale, num_classes)
