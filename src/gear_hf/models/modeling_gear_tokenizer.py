"""GEAR image tokenizer: VQ-16, LFQ-16 or IBQ-16 behind one `PreTrainedModel`.

Pixels in [-1, 1] -> encoder -> quant_conv -> quantizer (tokens + assignment logits) -> post_quant_conv ->
decoder -> pixels. Submodule names follow the official checkpoints, so converted weights load 1:1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..hub import GEARHubMixin
from .configuration_gear_tokenizer import GEARTokenizerConfig
from .magvit2 import Magvit2Decoder, Magvit2Encoder
from .quantizers import build_quantizer
from .tokenizer_blocks import LLAMAGEN_LAYOUT, TAMING_LAYOUT, ConvDecoder, ConvEncoder

# Tolerance for the [-1, 1] input-range check (images converted from uint8 are exactly in range).
_RANGE_SLACK = 1e-3


@dataclass
class GEARTokenizerEncoderOutput(ModelOutput):
    """Output of [`GEARTokenizerModel.encode`].

    Args:
        indices (`torch.LongTensor` of shape `(batch, h, w)`): tokens; `indices.flatten(1)` is raster order.
        quantized (`torch.FloatTensor` of shape `(batch, codebook_embed_dim, h, w)`): quantized latent, with a
            straight-through gradient to the encoder.
        assignment_logits (`torch.FloatTensor` of shape `(batch, h*w, codebook_size)`, *optional*): token-to-code
            affinities A with `argmax(A, -1) == indices.flatten(1)`; returned with `return_assignment=True`.
        latent (`torch.FloatTensor` of shape `(batch, codebook_embed_dim, h, w)`, *optional*): the
            pre-quantization latent z the quantizer reads (encoder → quant_conv; for LFQ the encoder output, before
            any normalisation or sign); returned with `return_latent=True`.
    """

    indices: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    assignment_logits: torch.FloatTensor | None = None
    latent: torch.FloatTensor | None = None


@dataclass
class GEARTokenizerOutput(ModelOutput):
    """Output of [`GEARTokenizerModel.forward`]. The loss fields are only set in training mode.

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch, 3, H, W)`): decoded image, roughly in [-1, 1],
            not clamped.
        indices, quantized, assignment_logits: as in [`GEARTokenizerEncoderOutput`].
        quantizer_loss (`torch.FloatTensor`): `codebook_loss + commitment_loss + entropy_loss`, the quantizer
            part of the tokenizer's generator loss.
        codebook_loss (`torch.FloatTensor`): VQ: `mean((e - sg(z))^2)`; IBQ: the whole IBQ quantiser loss;
            LFQ: 0.
        commitment_loss (`torch.FloatTensor`): `beta * mean((sg(e) - z)^2)` for VQ and LFQ; 0 for IBQ.
        entropy_loss (`torch.FloatTensor`): entropy regulariser already multiplied by `config.entropy_loss_ratio`.
        sample_entropy (`torch.FloatTensor`): mean per-token assignment entropy (unscaled, for logging).
        avg_entropy (`torch.FloatTensor`): entropy of the batch-average assignment (unscaled, for logging).
    """

    reconstruction: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    assignment_logits: torch.FloatTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None
    sample_entropy: torch.FloatTensor | None = None
    avg_entropy: torch.FloatTensor | None = None


class GEARTokenizerPreTrainedModel(PreTrainedModel):
    """Config class, checkpoint conventions and weight initialisation shared by the GEAR tokenizer models."""

    config: GEARTokenizerConfig
    config_class = GEARTokenizerConfig
    base_model_prefix = "tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResnetBlock", "AttnBlock", "AdaptiveGroupNorm"]
    # LlamaGen-format VQ checkpoints carry a persistent usage buffer that GEAR removed.
    _keys_to_ignore_on_load_unexpected = [r"^quantize\.codebook_used$"]

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default initialisation for convs/linears, unit GroupNorms, and the family's codebook init."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm) and module.affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # the codebook (handled here: quantizer modules own no direct params)
            weight = module.weight
            if self.config.quantizer == "vq":
                # Small uniform codes projected onto the unit sphere (codes are compared by cosine).
                if not getattr(weight, "_is_hf_initialized", False):
                    init.uniform_(weight, -1.0 / weight.shape[0], 1.0 / weight.shape[0])
                    init.copy_(weight, nn.functional.normalize(weight, p=2, dim=-1))
            else:
                init.normal_(weight, mean=0.0, std=1.0)


class GEARTokenizerModel(GEARHubMixin, GEARTokenizerPreTrainedModel):
    r"""A GEAR image tokenizer (VQ-16, LFQ-16 or IBQ-16, chosen by `config.quantizer`).

    Inputs are images in [-1, 1] (`uint8 / 127.5 - 1`) of shape `(B, config.num_channels, H, W)` with H and W
    divisible by `config.downsample_factor`. In eval mode, inputs outside [-1, 1] (e.g. [0, 255] pixels) still run
    but emit a `UserWarning` telling you to rescale them (set `check_input_range = False` to skip the check and
    its host sync).

    ```python
    >>> tokenizer = GEARTokenizerModel(GEARTokenizerConfig.from_preset("VQ-16")).eval()
    >>> tokens = tokenizer.encode(pixel_values).indices  # (B, 16, 16) for 256 px
    >>> images = tokenizer.decode(tokens)                 # (B, 3, 256, 256), roughly [-1, 1]
    ```
    """

    def __init__(self, config: GEARTokenizerConfig):
        super().__init__(config)
        if config.quantizer == "lfq":
            self.encoder = Magvit2Encoder(config)
            self.decoder = Magvit2Decoder(config)
            # MAGVIT2 quantizes the encoder output directly.
            self.quant_conv = nn.Identity()
            self.post_quant_conv = nn.Identity()
        else:
            layout = LLAMAGEN_LAYOUT if config.quantizer == "vq" else TAMING_LAYOUT
            self.encoder = ConvEncoder(config, layout)
            self.decoder = ConvDecoder(config, layout)
            self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
            self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)
        self.quantize = build_quantizer(config)
        self.check_input_range = True
        self.post_init()

    # ----------------------------------------------------------------------------------------- input checks
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a (batch, {self.config.num_channels}, height, width) tensor, got {shape}. "
                "Add a batch dimension with pixel_values[None] for a single image."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the tokenizer expects "
                f"{self.config.num_channels} (channels-first). Convert images to RGB and permute (B, H, W, C) "
                "arrays with .permute(0, 3, 1, 2)."
            )
        factor = self.config.downsample_factor
        height, width = pixel_values.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the downsample factor {factor}. Resize or "
                f"center-crop to a multiple of {factor} (e.g. {self.config.image_size}x{self.config.image_size})."
            )
        # The range check reads values back to the host, so it is skipped in training and when a caller that
        # builds inputs from uint8 itself (the stage-2 trainer) sets `check_input_range = False`.
        if pixel_values.numel() and self.check_input_range and not self.training:
            low, high = torch.aminmax(pixel_values.detach())
            if low.item() < -1 - _RANGE_SLACK or high.item() > 1 + _RANGE_SLACK:
                warnings.warn(
                    f"pixel_values span [{low.item():.3g}, {high.item():.3g}] but the tokenizer expects [-1, 1]. "
                    "Rescale uint8 images with pixels / 127.5 - 1.",
                    UserWarning,
                    stacklevel=3,
                )

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Validate tokens and return them as (B, h, w) int64."""
        if not torch.is_tensor(indices) or indices.is_floating_point() or indices.is_complex():
            raise ValueError("indices must be an integer tensor of shape (B, h, w) or (B, h*w).")
        if indices.ndim == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(
                    f"Cannot infer the token grid of {indices.shape[1]} tokens per image (not a square). "
                    "Pass indices shaped (B, h, w) instead."
                )
            indices = indices.reshape(indices.shape[0], side, side)
        elif indices.ndim != 3:
            raise ValueError(f"indices must have shape (B, h, w) or (B, h*w), got {tuple(indices.shape)}.")
        if indices.numel():
            low, high = torch.aminmax(indices)
            if low.item() < 0 or high.item() >= self.config.codebook_size:
                raise ValueError(
                    f"Token indices must lie in [0, {self.config.codebook_size - 1}] (codebook_size="
                    f"{self.config.codebook_size}), got values in [{low.item()}, {high.item()}]. Tokens from an AR "
                    "model with extra special ids must be mapped back to codebook ids before decoding."
                )
        return indices.long()

    # ------------------------------------------------------------------------------------------ public API
    def _quantize_pixels(self, pixel_values: torch.Tensor, return_assignment: bool):
        """(pre-quantization latent, quantizer output)."""
        self._check_pixel_values(pixel_values)
        latent = self.quant_conv(self.encoder(pixel_values))
        return latent, self.quantize(latent, return_assignment=return_assignment)

    def encode(
        self, pixel_values: torch.Tensor, return_assignment: bool = False, return_latent: bool = False
    ) -> GEARTokenizerEncoderOutput:
        """Tokenize images in [-1, 1] of shape (B, C, H, W).

        Returns `indices` (B, h, w), `quantized` (B, D, h, w), with `return_assignment=True` also
        `assignment_logits` (B, h*w, K), and with `return_latent=True` the pre-quantization `latent` (B, D, h, w).
        Warns (once per call) when the input is outside [-1, 1].
        """
        latent, out = self._quantize_pixels(pixel_values, return_assignment)
        return GEARTokenizerEncoderOutput(
            indices=out.indices,
            quantized=out.quantized,
            assignment_logits=out.assignment_logits,
            latent=latent if return_latent else None,
        )

    def decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode a quantized latent (B, D, h, w) into an image (B, C, h*f, w*f), not clamped."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode tokens (B, h, w) or square (B, h*w) into images (B, C, H, W), roughly in [-1, 1], not clamped.

        Raises `ValueError` for tokens outside [0, codebook_size).
        """
        indices = self._check_indices(indices)
        codes = self.quantize.codes_from_indices(indices).to(self.dtype)  # (B, h, w, D)
        return self.decode_latent(codes.permute(0, 3, 1, 2).contiguous())

    def forward(self, pixel_values: torch.Tensor, return_assignment: bool = False) -> GEARTokenizerOutput:
        """Encode, quantize and decode images in [-1, 1]; in training mode also return the quantizer losses."""
        _, out = self._quantize_pixels(pixel_values, return_assignment)
        reconstruction = self.decode_latent(out.quantized)
        quantizer_loss = None
        if out.entropy_loss is not None:
            quantizer_loss = out.codebook_loss + out.commitment_loss + out.entropy_loss
        return GEARTokenizerOutput(
            reconstruction=reconstruction,
            indices=out.indices,
            quantized=out.quantized,
            assignment_logits=out.assignment_logits,
            quantizer_loss=quantizer_loss,
            codebook_loss=out.codebook_loss,
            commitment_loss=out.commitment_loss,
            entropy_loss=out.entropy_loss,
            sample_entropy=out.sample_entropy,
            avg_entropy=out.avg_entropy,
        )

    # ----------------------------------------------------------------------------------- official weights


__all__ = [
    "GEARTokenizerEncoderOutput",
    "GEARTokenizerModel",
    "GEARTokenizerOutput",
    "GEARTokenizerPreTrainedModel",
]
