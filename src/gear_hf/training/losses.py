"""Tokenizer losses: L1 reconstruction, LPIPS perceptual loss, PatchGAN discriminator with hinge loss.

The generator objective (official `loss_l1_lpips_gan_vq.yaml`, see `official_code_spec.md` §4) is

    L_G = w_l1·|x − x̂|₁ + w_lpips·LPIPS(x, x̂) + w_q·L_quant + w_gan·(−mean D(x̂))

and the discriminator objective is the hinge loss 0.5·(mean relu(1 − D(x)) + mean relu(1 + D(sg(x̂)))).
Images are in [-1, 1] everywhere. Both losses run in fp32 with autocast disabled.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's VGG16 ImageNet weights (IMAGENET1K_V1), the backbone LPIPS was calibrated on.
VGG16_WEIGHTS_FILENAME = "vgg16-397923af.pth"


class PatchGANDiscriminator(nn.Module):
    """The taming-transformers / pix2pix PatchGAN (`NLayerDiscriminator`) with BatchNorm.

    At the official size (ndf 64, 3 layers) it has 2 765 633 parameters, maps a 256 px image to a (B, 1, 30, 30)
    logit map, and its state-dict keys are `main.{0,2,3,5,6,8,9,11}.*`, so official `discriminator` weights load
    directly. The module is kept in train mode by the training loop (batch statistics, as in the official code).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)  # conv biases keep PyTorch's default init
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)

    def to_sync_batchnorm(self) -> nn.Module:
        """Return this discriminator with SyncBatchNorm layers (same state-dict keys), as the official code does
        under multi-GPU training. SyncBatchNorm needs CUDA/XPU tensors; keep BatchNorm for CPU runs."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LPIPS(nn.Module):
    """Frozen VGG16 LPIPS (v0.1) from the `lpips` package, for images in [-1, 1]; returns the batch mean.

    The linear heads ship inside the `lpips` wheel. The VGG16 backbone is torchvision's ImageNet checkpoint
    `vgg16-397923af.pth`, read from `backbone_path` or from the torch hub cache — never downloaded.
    `random_backbone=True` skips it (tests only: the values are then meaningless).

    The network is stored outside the module tree on purpose: it is a fixed metric, so it must not appear in
    `state_dict()` (checkpoints), `parameters()` (optimizers, DDP) or `train()`; `.to()` still moves it.
    """

    def __init__(self, backbone_path: str | os.PathLike | None = None, random_backbone: bool = False):
        super().__init__()
        import lpips

        if not random_backbone:
            backbone_path = _vgg16_weights_file(backbone_path)  # fail before the slow build if it is missing
        # Built on the meta device, then every tensor is filled explicitly: this skips the random init of all of
        # torchvision's VGG16 (138 M parameters, mostly the classifier LPIPS drops) and any download attempt.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips' `pretrained=`
            net = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        net.to_empty(device="cpu")
        net.scaling_layer = lpips.ScalingLayer()
        heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
        net.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
        if random_backbone:
            for module in net.net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(module.bias)
        else:
            load_vgg16_backbone(net.net, backbone_path)
        net.eval().requires_grad_(False)
        self.__dict__["net"] = net

    def _apply(self, fn, recurse=True):
        self.net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        return super().train(False)  # the metric always runs in eval mode (no dropout)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.net(images, reconstructions).mean()


def _vgg16_weights_file(backbone_path: str | os.PathLike | None) -> str | os.PathLike:
    if backbone_path is None:
        backbone_path = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS_FILENAME)
    if not os.path.isfile(backbone_path):
        raise FileNotFoundError(
            f"LPIPS needs the torchvision VGG16 ImageNet weights '{VGG16_WEIGHTS_FILENAME}', not found at "
            f"{backbone_path}. Copy that file there (it is torchvision's IMAGENET1K_V1 checkpoint), or pass "
            "`loss.lpips_backbone=/path/to/vgg16-397923af.pth`. gear_hf never downloads it."
        )
    return backbone_path


def load_vgg16_backbone(trunk: nn.Module, backbone_path: str | os.PathLike | None = None) -> None:
    """Load torchvision's VGG16 `features.*` weights into the `lpips` VGG trunk (`slice1`…`slice5`)."""
    state = torch.load(_vgg16_weights_file(backbone_path), map_location="cpu", weights_only=True)
    # lpips keeps torchvision's layer indices inside its five slices (slice4 holds `17`, `19`, `21`, …).
    for slice_index in range(1, 6):
        block = getattr(trunk, f"slice{slice_index}")
        block.load_state_dict({key: state[f"features.{key}"] for key in block.state_dict()})


class TokenizerLoss(nn.Module):
    """Generator and discriminator objectives of the tokenizer (`official_code_spec.md` §4).

    The discriminator is passed to each call rather than owned, so the training loop can prepare it with
    accelerate (DDP) and checkpoint it on its own. The caller freezes the discriminator
    (`requires_grad_(False)`) around the generator backward so that L_G leaves no gradient on it.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        lpips_weight: float = 1.0,  # official yaml value; the paper's table says 0.1
        quantizer_weight: float = 1.0,
        gan_weight: float = 0.1,
        discriminator_start: int = 0,
        lpips: LPIPS | None = None,
    ):
        super().__init__()
        self.l1_weight = l1_weight
        self.lpips_weight = lpips_weight
        self.quantizer_weight = quantizer_weight
        self.gan_weight = gan_weight
        self.discriminator_start = discriminator_start
        if lpips_weight > 0 and lpips is None:
            raise ValueError("lpips_weight > 0 needs an `LPIPS` module (pass lpips=LPIPS(...) or lpips_weight=0).")
        self.lpips = lpips

    def gan_active(self, step: int) -> bool:
        return self.gan_weight > 0 and step >= self.discriminator_start

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quantizer_loss: torch.Tensor | None = None,
        discriminator: nn.Module | None = None,
        step: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Return {"loss": L_G (with grad), "l1", "lpips", "quantizer", "gan"} as scalar tensors."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            images, reconstructions = images.float(), reconstructions.float()
            zero = images.new_zeros(())
            l1 = F.l1_loss(reconstructions, images)
            perceptual = self.lpips(images, reconstructions) if self.lpips_weight > 0 else zero
            quantizer = quantizer_loss.float() if quantizer_loss is not None else zero
            if discriminator is not None and self.gan_active(step):
                gan = hinge_generator_loss(discriminator(reconstructions).float())
            else:
                gan = zero
            loss = (self.l1_weight * l1 + self.lpips_weight * perceptual
                    + self.quantizer_weight * quantizer + self.gan_weight * gan)
        return {"loss": loss, "l1": l1.detach(), "lpips": perceptual.detach(),
                "quantizer": quantizer.detach(), "gan": gan.detach()}

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, discriminator: nn.Module
    ) -> dict[str, torch.Tensor]:
        """Hinge loss on real images and detached reconstructions (two separate forwards, as the official code:
        BatchNorm sees real and fake batches separately)."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits_real = discriminator(images.detach().float()).float()
            logits_fake = discriminator(reconstructions.detach().float()).float()
            loss = hinge_discriminator_loss(logits_real, logits_fake)
        return {"loss": loss, "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
