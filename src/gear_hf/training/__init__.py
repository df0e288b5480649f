"""Training building blocks: tokenizer losses, REPA alignment, EMA, codebook statistics and data."""

from .alignment import (
    DINOv2Teacher,
    DINOv3Teacher,
    EfficientNetLiteTeacher,
    Projector,
    ProjectorBank,
    REPATeacher,
    SigLIP2Teacher,
    VJEPA2Teacher,
    load_teacher,
    repa_loss,
    spatial_norm,
)
from .codebook_stats import CodebookUsage, assignment_statistics, usage_statistics
from .data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    StreamingImageDataset,
    TrainTransform,
    build_train_dataset,
    collate,
    fashion_mnist_dataset,
    load_image_dataset,
)
from .ema import EMA
from .losses import (
    LPIPS,
    PatchGANDiscriminator,
    TokenizerLoss,
    hinge_discriminator_loss,
    hinge_generator_loss,
)

__all__ = [
    "CodebookUsage",
    "DINOv2Teacher",
    "DINOv3Teacher",
    "EMA",
    "EfficientNetLiteTeacher",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "LPIPS",
    "PatchGANDiscriminator",
    "Projector",
    "ProjectorBank",
    "REPATeacher",
    "SigLIP2Teacher",
    "StreamingImageDataset",
    "TokenizerLoss",
    "TrainTransform",
    "VJEPA2Teacher",
    "assignment_statistics",
    "build_train_dataset",
    "collate",
    "fashion_mnist_dataset",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "load_image_dataset",
    "load_teacher",
    "repa_loss",
    "spatial_norm",
    "usage_statistics",
]
