"""Open-MAGVIT2 encoder/decoder of the LFQ-16 tokenizer.

Compared with the VQGAN backbone (`tokenizer_blocks.py`): bias-free residual convs, no attention, a symmetric
stride-2 conv for downsampling, a conv + depth-to-space upsampler, and decoder GroupNorms whose scale and
shift are predicted from the statistics of the quantized latent (`AdaptiveGroupNorm`).
"""

from __future__ import annotations

import torch
from torch import nn

from .tokenizer_blocks import GROUP_NORM_EPS, ResnetBlock, ResolutionLevel, group_norm, swish


def depth_to_space(x: torch.Tensor, block_size: int = 2) -> torch.Tensor:
    """(B, s*s*C, H, W) -> (B, C, s*H, s*W) in DCR order: out[c, s*h + i, s*w + j] = in[(s*i + j)*C + c, h, w]."""
    batch, channels, height, width = x.shape
    out_channels = channels // block_size**2
    x = x.view(batch, block_size, block_size, out_channels, height, width)
    x = x.permute(0, 3, 4, 1, 5, 2)
    return x.reshape(batch, out_channels, height * block_size, width * block_size)


class DepthToSpaceUpsampler(nn.Module):
    """conv3x3 C -> 4C, then depth-to-space: 2x upsampling without interpolation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), block_size=2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine whose per-channel scale/shift are linear in the latent's spatial std/mean.

    scale = gamma(sqrt(var(z) + eps)), shift = beta(mean(z)), both over the spatial positions of the quantized
    latent z. The variance is the unbiased one (divides by h*w - 1), as in the released models.
    """

    def __init__(self, latent_channels: int, channels: int):
        super().__init__()
        self.gn = group_norm(channels, affine=False)
        self.gamma = nn.Linear(latent_channels, channels)
        self.beta = nn.Linear(latent_channels, channels)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        flat = latent.flatten(2)
        scale = self.gamma(torch.sqrt(flat.var(dim=-1, unbiased=True) + GROUP_NORM_EPS))
        shift = self.beta(flat.mean(dim=-1))
        return scale.view(batch, channels, 1, 1) * self.gn(x) + shift.view(batch, channels, 1, 1)


class Magvit2Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, log2 K, H/f, W/f)."""

    def __init__(self, config):
        super().__init__()
        ch, mults, n_blocks = config.base_channels, config.channel_multipliers, config.num_res_blocks
        self.conv_in = nn.Conv2d(config.num_channels, ch, kernel_size=3, padding=1, bias=False)
        levels, block_in = [], ch
        for level, mult in enumerate(mults):
            block_out = ch * mult
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out, bias=False) for i in range(n_blocks)]
            downsample = (
                nn.Conv2d(block_out, block_out, kernel_size=3, stride=2, padding=1) if level < len(mults) - 1 else None
            )
            levels.append(ResolutionLevel(blocks, resample=downsample, blocks_name="block", resample_name="downsample"))
            block_in = block_out
        self.down = nn.ModuleList(levels)
        self.mid_block = nn.Sequential(*[ResnetBlock(block_in, block_in, bias=False) for _ in range(n_blocks)])
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(pixel_values)
        for level in self.down:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Magvit2Decoder(nn.Module):
    """Quantized latent (B, log2 K, h, w) -> image; every level starts with an `AdaptiveGroupNorm` on the latent."""

    def __init__(self, config):
        super().__init__()
        ch, mults, n_blocks = config.base_channels, config.channel_multipliers, config.num_res_blocks
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid_block = nn.Sequential(*[ResnetBlock(block_in, block_in, bias=False) for _ in range(n_blocks)])
        adaptive, levels = [None] * len(mults), [None] * len(mults)  # both indexed by level (0 = full resolution)
        for level in reversed(range(len(mults))):
            block_out = ch * mults[level]
            adaptive[level] = AdaptiveGroupNorm(config.z_channels, block_in)
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out, bias=False) for i in range(n_blocks)]
            upsample = DepthToSpaceUpsampler(block_out) if level > 0 else None
            levels[level] = ResolutionLevel(blocks, resample=upsample, blocks_name="block", resample_name="upsample")
            block_in = block_out
        self.adaptive = nn.ModuleList(adaptive)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.num_channels, kernel_size=3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(latent))
        for level in reversed(range(len(self.up))):
            h = self.up[level](self.adaptive[level](h, latent))
        return self.conv_out(swish(self.norm_out(h)))


__all__ = ["AdaptiveGroupNorm", "DepthToSpaceUpsampler", "Magvit2Decoder", "Magvit2Encoder", "depth_to_space"]
