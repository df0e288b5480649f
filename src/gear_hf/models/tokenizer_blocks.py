"""Convolutional encoder/decoder of the VQ-16 (LlamaGen VQGAN) and IBQ-16 (taming) tokenizers.

Both backbones compute the same thing: per resolution level a few residual blocks (plus self-attention at the
chosen levels) and a 2x resampling, around a [res, attn, res] middle. They differ only in how the official
checkpoints name the submodules, which `KeyLayout` captures so that converted weights load 1:1. The residual
block and the resolution level are also used by the MAGVIT2 backbone of LFQ-16 (`magvit2.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written out (rather than F.silu) to reproduce the reference rounding exactly.
    return x * torch.sigmoid(x)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=affine)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> dropout -> conv3x3, plus a (1x1 if needed) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(batch, channels, height * width).transpose(1, 2)
        k = self.k(h).reshape(batch, channels, height * width)
        v = self.v(h).reshape(batch, channels, height * width)
        weights = torch.softmax(torch.bmm(q, k) * channels**-0.5, dim=2)
        h = torch.bmm(v, weights.transpose(1, 2)).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after zero-padding only the right and bottom edges."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionLevel(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention, then an optional resampler.

    `blocks_name` and `resample_name` only choose the checkpoint key names (e.g. `res` / `block`,
    `downsample` / `upsample`).
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        attentions: list[nn.Module] | None = None,
        resample: nn.Module | None = None,
        blocks_name: str = "block",
        resample_name: str = "downsample",
    ):
        super().__init__()
        self.blocks_name = blocks_name
        self.resample_name = resample_name if resample is not None else None
        self.add_module(blocks_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attentions or [])  # empty lists add no checkpoint keys
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self.blocks_name)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


@dataclass(frozen=True)
class KeyLayout:
    """How an official checkpoint names the levels and the middle of the encoder/decoder."""

    encoder_levels: str
    decoder_levels: str
    blocks: str
    mid_names: tuple[str, str, str] | None  # None: a plain list, keys mid.0 / mid.1 / mid.2
    decoder_stored_lowest_first: bool  # True: decoder level list is in processing order (lowest resolution first)


LLAMAGEN_LAYOUT = KeyLayout("conv_blocks", "conv_blocks", "res", None, True)
TAMING_LAYOUT = KeyLayout("down", "up", "block", ("block_1", "attn_1", "block_2"), False)


def _middle(channels: int, dropout: float, layout: KeyLayout) -> nn.Sequential:
    modules = [ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)]
    if layout.mid_names is None:
        return nn.Sequential(*modules)
    return nn.Sequential(OrderedDict(zip(layout.mid_names, modules)))


class ConvEncoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H/f, W/f) with f = 2 ** (len(channel_multipliers) - 1)."""

    def __init__(self, config, layout: KeyLayout):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        self.conv_in = nn.Conv2d(config.num_channels, ch, kernel_size=3, padding=1)
        levels, block_in = [], ch
        for level, mult in enumerate(mults):
            block_out = ch * mult
            blocks = [
                ResnetBlock(block_in if i == 0 else block_out, block_out, config.dropout)
                for i in range(config.num_res_blocks)
            ]
            attentions = (
                [AttnBlock(block_out) for _ in blocks] if level in config.attention_levels else None
            )
            resample = Downsample(block_out) if level < len(mults) - 1 else None
            levels.append(ResolutionLevel(blocks, attentions, resample, layout.blocks, "downsample"))
            block_in = block_out
        self.add_module(layout.encoder_levels, nn.ModuleList(levels))
        self.levels_name = layout.encoder_levels
        self.mid = _middle(block_in, config.dropout, layout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(pixel_values)
        for level in getattr(self, self.levels_name):
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class ConvDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f); one more residual block per level than the encoder."""

    def __init__(self, config, layout: KeyLayout):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _middle(block_in, config.dropout, layout)
        levels = []  # processing order: lowest resolution first
        for level in reversed(range(len(mults))):
            block_out = ch * mults[level]
            blocks = [
                ResnetBlock(block_in if i == 0 else block_out, block_out, config.dropout)
                for i in range(config.num_res_blocks + 1)
            ]
            attentions = (
                [AttnBlock(block_out) for _ in blocks] if level in config.attention_levels else None
            )
            resample = Upsample(block_out) if level > 0 else None
            levels.append(ResolutionLevel(blocks, attentions, resample, layout.blocks, "upsample"))
            block_in = block_out
        self.lowest_first = layout.decoder_stored_lowest_first
        self.levels_name = layout.decoder_levels
        self.add_module(self.levels_name, nn.ModuleList(levels if self.lowest_first else levels[::-1]))
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.num_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self.levels_name)
        for level in levels if self.lowest_first else reversed(levels):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


__all__ = [
    "AttnBlock",
    "ConvDecoder",
    "ConvEncoder",
    "Downsample",
    "KeyLayout",
    "LLAMAGEN_LAYOUT",
    "ResnetBlock",
    "ResolutionLevel",
    "TAMING_LAYOUT",
    "Upsample",
    "group_norm",
    "swish",
]
