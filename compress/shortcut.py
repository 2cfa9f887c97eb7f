"""Q-Diffusion's shortcut splitting for UNet decoder concatenations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowpress.errors import FlowpressError
from flowpress.models import DiffusersDenoiser


class SplitConv2d(nn.Module):
    """conv(cat[h, skip]) computed as conv_h(h) + conv_skip(skip).

    The decoder's h and the encoder's skip have very different ranges; as two convs each half
    gets its own activation quantizer (and per-channel weight scales).
    """

    def __init__(self, conv: nn.Conv2d, split: int):
        super().__init__()
        if not 0 < split < conv.in_channels or conv.groups != 1:
            raise FlowpressError(f"shortcut splitting: cannot split a conv with {conv.in_channels} inputs at {split}")
        self.split = split

        def half(in_channels: int, bias: bool) -> nn.Conv2d:
            kernel, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
            return nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, dilation, bias=bias)  # type: ignore[arg-type]

        self.conv_h = half(split, conv.bias is not None)
        self.conv_skip = half(conv.in_channels - split, False)
        with torch.no_grad():
            self.conv_h.weight.copy_(conv.weight[:, :split])
            self.conv_skip.weight.copy_(conv.weight[:, split:])
            if conv.bias is not None and self.conv_h.bias is not None:
                self.conv_h.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_h(x[:, : self.split]) + self.conv_skip(x[:, self.split :])


def split_shortcuts(model: DiffusersDenoiser) -> list[str]:
    """Replace every UNet up-block resnet's conv_shortcut (its input is cat[h, skip]) in place.

    The split point is h's channel count: diffusers' up blocks concatenate the running
    hidden state (the previous block's output channels for the first resnet, the block's
    own after that) with the skip.  Returns the names of the split convs.
    """
    if model.architecture != "unet":
        return []
    reversed_channels = list(reversed(model.net.config.block_out_channels))
    split_names = []
    for b, block in enumerate(model.net.up_blocks):
        prev_channels = reversed_channels[max(b - 1, 0)]
        for i, resnet in enumerate(block.resnets):
            conv = resnet.conv_shortcut
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
                continue
            h_channels = prev_channels if i == 0 else reversed_channels[b]
            resnet.conv_shortcut = SplitConv2d(conv, h_channels)
            split_names.append(f"net.up_blocks.{b}.resnets.{i}.conv_shortcut")
    return split_names
