"""Training images through the `datasets` library: local image folders, Hub datasets, WebDataset shards and the
bundled Fashion-MNIST subset; the official train augmentation; a collate to uint8 batches.

Augmentation (spec §6): Resize(short side = image_size, bicubic) → RandomCrop(image_size) → horizontal flip
(p = 0.5) → uint8 (3, H, W). Its randomness comes from (seed, epoch, sample key) only — never from global RNG —
so a resumed run sees exactly the same crops and flips. Unreadable images are skipped and counted in the batch
(`num_skipped`) instead of crashing the run.
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from importlib import resources

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def fashion_mnist_dataset() -> datasets.Dataset:
    """The bundled real Fashion-MNIST subset (4 000 grayscale 28×28 images, 10 classes; MIT, © Zalando SE)."""
    with resources.files("gear_hf").joinpath("assets", "fashion_mnist_4k.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.astype(np.int64).tolist()},
        features=features,
    )


def load_image_dataset(
    source: str,
    path: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load `source` ∈ {fashion-mnist, imagefolder, hub, webdataset} with columns `image` (undecoded) and `label`.

    `path`: the image folder (`<path>/<class>/<image>`), a Hub dataset id, or a shard glob (`shards/*.tar`).
    WebDataset shards are streamed (an `IterableDataset`); the other sources are map-style.
    """
    if source != "fashion-mnist" and not path:
        raise ValueError(f"Data source {source!r} needs data.path (a folder, Hub dataset id or shard glob).")
    try:
        if source == "fashion-mnist":
            dataset = fashion_mnist_dataset()
        elif source == "imagefolder":
            dataset = datasets.load_dataset("imagefolder", data_dir=path, split=split, cache_dir=cache_dir)
        elif source == "hub":
            dataset = datasets.load_dataset(path, split=split, cache_dir=cache_dir)
        elif source == "webdataset":
            dataset = datasets.load_dataset(
                "webdataset", data_files={split: path}, split=split, streaming=True, cache_dir=cache_dir
            )
        else:
            raise ValueError(f"Unknown data source {source!r}; use fashion-mnist, imagefolder, hub or webdataset.")
    except datasets.data_files.EmptyDatasetError as error:
        raise ValueError(f"No images found for data source {source!r} at {path!r}: {error}") from error
    dataset = _standardize_columns(dataset, source, path)
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"No images found for data source {source!r} at {path!r}.")
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
    elif max_samples is not None:
        dataset = dataset.take(max_samples)
    return dataset


def _standardize_columns(dataset, source: str, path: str | None):
    features = dataset.features or {}
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise ValueError(
            f"Data source {source!r} at {path!r} has no image column (features: {list(features)}); "
            "expected image files or a column of type datasets.Image."
        )
    # Decode ourselves, so one unreadable file can be skipped instead of crashing the loader. (Cast before
    # renaming: a streamed dataset would otherwise still decode under the old column name.)
    dataset = dataset.cast_column(image_columns[0], datasets.Image(decode=False))
    if image_columns[0] != "image":
        dataset = dataset.rename_column(image_columns[0], "image")
    label_column = next((name for name in ("label", "labels", "cls") if name in features), None)
    if label_column is None:
        label_column = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label_column is not None and label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    return dataset


def class_names(dataset) -> list[str] | None:
    """Class names of a dataset from `load_image_dataset`, or None when its labels are not a ClassLabel."""
    feature = (dataset.features or {}).get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


def sample_generator(seed: int, epoch: int, sample_key: int) -> torch.Generator:
    """A torch generator determined by (seed, epoch, sample key) alone."""
    state = np.random.SeedSequence([seed, epoch, sample_key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TrainTransform:
    """Official train augmentation: short-side bicubic resize → random crop → random horizontal flip → uint8."""

    def __init__(self, image_size: int, random_flip: bool = True):
        self.image_size = image_size
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        image = TF.resize(image.convert("RGB"), self.image_size, interpolation=InterpolationMode.BICUBIC)
        height, width = image.height, image.width
        top = int(torch.randint(0, height - self.image_size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - self.image_size + 1, (1,), generator=generator))
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        if self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return TF.pil_to_tensor(image)


def decode_image(value: dict | Image.Image) -> Image.Image:
    """Decode an undecoded `datasets.Image` value ({"bytes", "path"}); raises on unreadable data."""
    if isinstance(value, Image.Image):
        return value
    image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
    image.load()
    return image


# ---------------------------------------------------------------------------------------------------------------
# Torch datasets and collate
# ---------------------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Map-style training dataset: item i → {"pixel_values": uint8 (3, S, S), "label", "num_skipped"}.

    An unreadable image is replaced by the next readable one (so batches keep their size) and counted in
    `num_skipped`. Call `set_epoch` at the start of every epoch; augmentation depends on (seed, epoch, i).
    """

    def __init__(self, dataset: datasets.Dataset, image_size: int, random_flip: bool = True, seed: int = 0):
        self.dataset = dataset
        self.transform = TrainTransform(image_size, random_flip)
        self.seed = seed
        self.epoch = 0
        self.class_names = class_names(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.dataset)):
            row = self.dataset[(index + offset) % len(self.dataset)]
            try:
                image = decode_image(row["image"])
            except _IMAGE_ERRORS as error:
                logger.warning("Skipping unreadable image %s: %s", _describe(row["image"]), error)
                continue
            generator = sample_generator(self.seed, self.epoch, index)
            return {"pixel_values": self.transform(image, generator), "label": row.get("label", 0),
                    "num_skipped": offset}
        raise ValueError("None of the dataset's images can be read.")


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Streamed training dataset (e.g. WebDataset shards) with the same samples as `ImageDataset`.

    Augmentation depends on (seed, epoch, CRC32 of the sample's `__key__`), so it does not depend on how shards are
    split across ranks and workers. With `world_size > 1`, shards are split by rank here (`split_dataset_by_node`);
    DataLoader workers then split the rank's shards. Unreadable samples are dropped and counted in the next
    sample's `num_skipped`.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        image_size: int,
        random_flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size > 1:
            dataset = datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.transform = TrainTransform(image_size, random_flip)
        self.seed = seed
        self.epoch = 0
        self.class_names = class_names(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        for position, row in enumerate(self.dataset):
            try:
                image = decode_image(row["image"])
            except _IMAGE_ERRORS as error:
                logger.warning("Skipping unreadable image %s: %s", row.get("__key__", position), error)
                skipped += 1
                continue
            key = zlib.crc32(str(row.get("__key__", position)).encode())
            generator = sample_generator(self.seed, self.epoch, key)
            yield {"pixel_values": self.transform(image, generator), "label": row.get("label", 0),
                   "num_skipped": skipped}
            skipped = 0


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """→ {"pixel_values": uint8 (B, 3, S, S), "labels": int64 (B,), "num_skipped": int64 ()}."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "num_skipped": torch.tensor(sum(s["num_skipped"] for s in samples), dtype=torch.int64),
    }


def _describe(value) -> str:
    if isinstance(value, dict):
        return value.get("path") or "<in-memory bytes>"
    return type(value).__name__


def build_train_dataset(
    source: str,
    path: str | None,
    image_size: int,
    split: str = "train",
    random_flip: bool = True,
    seed: int = 0,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset | StreamingImageDataset:
    """One call from the `data` config section to a torch dataset ready for `DataLoader(..., collate_fn=collate)`."""
    dataset = load_image_dataset(source, path, split=split, max_samples=max_samples, cache_dir=cache_dir)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamingImageDataset(dataset, image_size, random_flip, seed, rank=rank, world_size=world_size)
    return ImageDataset(dataset, image_size, random_flip, seed)
