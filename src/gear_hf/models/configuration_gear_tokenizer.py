"""Configuration of the GEAR image tokenizers (VQ-16, LFQ-16 and IBQ-16)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

QUANTIZERS = ("vq", "lfq", "ibq")

# Architecture defaults that differ between the three families. A field left as `None` is filled from here.
_FAMILY_DEFAULTS = {
    # LlamaGen VQGAN with an L2-normalised 8-d codebook.
    "vq": {"codebook_embed_dim": 8, "num_res_blocks": 2, "z_channels": 256, "attention": True},
    # Open-MAGVIT2 autoencoder: sign quantiser, latent width = log2(codebook_size), no attention.
    "lfq": {"codebook_embed_dim": None, "num_res_blocks": 4, "z_channels": None, "attention": False},
    # taming/LDM autoencoder with an inner-product codebook.
    "ibq": {"codebook_embed_dim": 256, "num_res_blocks": 4, "z_channels": 256, "attention": True},
}

# The released GEAR tokenizers (256 px, 16x downsampling, K = 16384).
PRESETS = {
    "VQ-16": {"quantizer": "vq", "codebook_size": 16384, "codebook_embed_dim": 8, "base_channels": 128,
              "channel_multipliers": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256,
              "attention_levels": [4], "image_size": 256},
    "LFQ-16": {"quantizer": "lfq", "codebook_size": 16384, "codebook_embed_dim": 14, "base_channels": 128,
               "channel_multipliers": [1, 1, 2, 2, 4], "num_res_blocks": 4, "z_channels": 14,
               "attention_levels": [], "image_size": 256},
    "IBQ-16": {"quantizer": "ibq", "codebook_size": 16384, "codebook_embed_dim": 256, "base_channels": 128,
               "channel_multipliers": [1, 1, 2, 2, 4], "num_res_blocks": 4, "z_channels": 256,
               "attention_levels": [4], "image_size": 256},
}

GROUP_NORM_GROUPS = 32


class GEARTokenizerConfig(PreTrainedConfig):
    r"""Configuration of [`GEARTokenizerModel`], one class for the three GEAR tokenizer families.

    Use [`GEARTokenizerConfig.from_preset`] for the released architectures ("VQ-16", "LFQ-16", "IBQ-16");
    smaller widths, codebooks and resolutions are fine for tests and demos.

    Args:
        quantizer (`str`): `"vq"` (L2-normalised nearest-neighbour codebook, LlamaGen VQGAN backbone),
            `"lfq"` (lookup-free sign quantiser, Open-MAGVIT2 backbone) or `"ibq"` (index-backpropagation
            inner-product codebook, taming backbone).
        codebook_size (`int`): number of codes K. LFQ needs a power of two.
        codebook_embed_dim (`int`, *optional*): width D of a code. Defaults to 8 (vq), log2(K) (lfq, the only
            allowed value) or 256 (ibq).
        image_size (`int`): nominal input resolution; the token grid is `image_size // downsample_factor`.
        num_channels (`int`): image channels.
        base_channels (`int`): width of the first resolution level.
        channel_multipliers (`list[int]`): width multiplier per resolution level; there are
            `len(channel_multipliers) - 1` downsamplings by 2.
        num_res_blocks (`int`, *optional*): residual blocks per encoder level (the decoder uses one more for
            vq/ibq). Defaults to 2 (vq) or 4 (lfq, ibq).
        z_channels (`int`, *optional*): encoder output width before `quant_conv`. Defaults to 256 (vq, ibq);
            for lfq it equals `codebook_embed_dim`.
        attention_levels (`list[int]`, *optional*): encoder levels (0 = full resolution) that get a
            self-attention block after every residual block; the decoder mirrors them. Defaults to the lowest
            resolution level for vq/ibq and none for lfq (the MAGVIT2 backbone has no attention).
        dropout (`float`): dropout inside the vq/ibq residual blocks.
        commit_loss_beta (`float`): commitment weight beta.
        entropy_loss_ratio (`float`): multiplier of the entropy regulariser in `entropy_loss` (GEAR trainers: 0.05).
        entropy_temperature (`float`): temperature of the entropy regulariser's softmax.
        sample_entropy_weight (`float`): weight of the per-token entropy (minimised).
        avg_entropy_weight (`float`): weight of the entropy of the average assignment (maximised).
    """

    model_type = "gear_tokenizer"

    quantizer: str = "vq"
    codebook_size: int = 16384
    codebook_embed_dim: int | None = None
    image_size: int = 256
    num_channels: int = 3
    base_channels: int = 128
    channel_multipliers: list[int] | None = None
    num_res_blocks: int | None = None
    z_channels: int | None = None
    attention_levels: list[int] | None = None
    dropout: float = 0.0
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.05
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0
    avg_entropy_weight: float = 1.0

    def __post_init__(self, **kwargs):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"Unknown quantizer {self.quantizer!r}. Pass quantizer='vq', 'lfq' or 'ibq' "
                "(or use GEARTokenizerConfig.from_preset('VQ-16' | 'LFQ-16' | 'IBQ-16'))."
            )
        family = _FAMILY_DEFAULTS[self.quantizer]
        if self.channel_multipliers is None:
            self.channel_multipliers = [1, 1, 2, 2, 4]
        self.channel_multipliers = [int(m) for m in self.channel_multipliers]
        if self.num_res_blocks is None:
            self.num_res_blocks = family["num_res_blocks"]
        if self.attention_levels is None:
            self.attention_levels = [len(self.channel_multipliers) - 1] if family["attention"] else []
        self.attention_levels = sorted(int(level) for level in self.attention_levels)

        if self.quantizer == "lfq":
            bits = int(math.log2(self.codebook_size)) if self.codebook_size > 0 else 0
            if self.codebook_size < 2 or 2**bits != self.codebook_size:
                raise ValueError(
                    f"LFQ needs codebook_size to be a power of two (each code is a sign pattern of log2(K) bits), "
                    f"got {self.codebook_size}. Use e.g. codebook_size={2 ** math.ceil(math.log2(max(2, self.codebook_size)))}."
                )
            for name in ("codebook_embed_dim", "z_channels"):
                value = getattr(self, name)
                if value is not None and value != bits:
                    raise ValueError(
                        f"For LFQ the code width is fixed to log2(codebook_size) = {bits}, got {name}={value}. "
                        f"Leave {name} unset (None) or pass {name}={bits}."
                    )
            self.codebook_embed_dim = self.z_channels = bits
        else:
            if self.codebook_embed_dim is None:
                self.codebook_embed_dim = family["codebook_embed_dim"]
            if self.z_channels is None:
                self.z_channels = family["z_channels"]
        self._validate_architecture()
        super().__post_init__(**kwargs)

    def _validate_architecture(self):
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}.")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(
                f"channel_multipliers must be a non-empty list of positive ints, got {self.channel_multipliers}."
            )
        bad_widths = sorted(
            {self.base_channels * m for m in self.channel_multipliers if (self.base_channels * m) % GROUP_NORM_GROUPS}
        )
        if bad_widths:
            raise ValueError(
                f"Every level width base_channels * multiplier must be divisible by {GROUP_NORM_GROUPS} "
                f"(GroupNorm uses {GROUP_NORM_GROUPS} groups), but base_channels={self.base_channels} with "
                f"channel_multipliers={self.channel_multipliers} gives {bad_widths}. Use a base_channels that is a "
                f"multiple of {GROUP_NORM_GROUPS}."
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}.")
        levels = len(self.channel_multipliers)
        if any(level < 0 or level >= levels for level in self.attention_levels):
            raise ValueError(
                f"attention_levels must be level indices in [0, {levels - 1}] (0 = full resolution), "
                f"got {self.attention_levels}."
            )
        if self.quantizer == "lfq" and self.attention_levels:
            raise ValueError(
                "The LFQ (Open-MAGVIT2) backbone has no attention blocks; pass attention_levels=[] for quantizer='lfq'."
            )
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsample factor {self.downsample_factor} "
                f"(= 2 ** (len(channel_multipliers) - 1)). Use an image_size that is a multiple of "
                f"{self.downsample_factor}, e.g. {max(1, round(self.image_size / self.downsample_factor)) * self.downsample_factor}."
            )

    @property
    def downsample_factor(self) -> int:
        """Side length, in pixels, of the image patch that one token covers."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Side length of the token grid for an `image_size` input."""
        return self.image_size // self.downsample_factor

    @property
    def num_image_tokens(self) -> int:
        """Tokens per `image_size` image (`grid_size ** 2`)."""
        return self.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GEARTokenizerConfig:
        """Config of a released architecture: `"VQ-16"`, `"LFQ-16"` or `"IBQ-16"` (keyword overrides allowed)."""
        key = name.upper()
        if key not in PRESETS:
            raise ValueError(f"Unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def preset_for_quantizer(cls, quantizer: str, **overrides) -> GEARTokenizerConfig:
        """Released architecture of one quantizer family (`"vq"` -> VQ-16, ...)."""
        if quantizer not in QUANTIZERS:
            raise ValueError(f"Unknown quantizer {quantizer!r}. Pass 'vq', 'lfq' or 'ibq'.")
        return cls.from_preset(f"{quantizer.upper()}-16", **overrides)


__all__ = ["GEARTokenizerConfig"]
