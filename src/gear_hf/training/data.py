"""Training images through the `datasets` library: local image folders, Hub datasets, WebDataset shards and the
bundled Fashion-MNIST subset; the official train augmentation; a collate to uint8 batches.

Augmentation (spec §6): Resize(short side = image_size, bicubic) → RandomCrop(image_size) → horizontal flip
(p = 0.5) → uint8 (3, H, W). Its randomness comes from (seed, epoch, sample key) only — never from global RNG —
so a resumed run sees exactly the same crops and flips. Unreadable images are skipped and counted in the batch
(`num_skipped`) instead of crashing the run.

Captioned images (text-to-image, spec §3.4) come from the `CAPTION_SOURCES`:
* `gpic`: WebDataset shards of `{key}.json` (caption in its "caption" field) + `{key}.jpg|jpeg|png` (GPIC);
* `blip3o`: WebDataset shards of `{key}.txt` (the caption) + `{key}.jpg|jpeg|png` (BLIP3o);
* `fashion-mnist-captions`: the bundled Fashion-MNIST images with captions written from their labels.
Their transform is the official t2i one: short-side bicubic resize → *center* crop → random flip → uint8.
Captions are cut to 4 000 characters; a sample without image or caption is skipped and counted like an
unreadable image. Batches carry `captions` (a list of str) instead of `labels`.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
import zlib
from importlib import resources

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

CAPTION_SOURCES = ("gpic", "blip3o", "fashion-mnist-captions")
MAX_CAPTION_CHARS = 4000  # official: caps tokenizer time on pathological captions
# Per class: the noun phrase that fills the caption templates.
FASHION_MNIST_NOUNS = (
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker", "a bag",
    "an ankle boot",
)
FASHION_MNIST_CAPTION_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {} on a black background",
    "a grayscale image of {}",
    "a small black and white photo of {}",
)


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
            raise ValueError(f"Unknown data source {source!r}; use fashion-mnist, imagefolder, hub or webdataset "
                             f"(or, for captioned images, one of {', '.join(CAPTION_SOURCES)}).")
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


def fashion_mnist_caption(label: int, template: int = 1) -> str:
    """Caption of a Fashion-MNIST class with one of `FASHION_MNIST_CAPTION_TEMPLATES` ("a photo of a sneaker")."""
    return FASHION_MNIST_CAPTION_TEMPLATES[template].format(FASHION_MNIST_NOUNS[label])


def class_names(dataset) -> list[str] | None:
    """Class names of a dataset from `load_image_dataset`, or None when its labels are not a ClassLabel."""
    feature = (dataset.features or {}).get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ---------------------------------------------------------------------------------------------------------------
# Captioned WebDataset shards (read with tarfile: the `datasets` webdataset builder infers one schema from the first
# shard and silently drops e.g. the png images of later shards when GPIC mixes jpg and png)
# ---------------------------------------------------------------------------------------------------------------

_SHARD_LAYOUTS = {
    "gpic": '{key}.json with a "caption" field + {key}.jpg|jpeg|png',
    "blip3o": "{key}.txt (the caption) + {key}.jpg|jpeg|png",
}
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
_CAPTION_PROBE = 64  # samples read at start-up to check that the shards carry captions
_CAPTION_FEATURES = datasets.Features(
    {"__key__": datasets.Value("string"), "image": datasets.Image(decode=False), "caption": datasets.Value("string")}
)


def resolve_shards(path: str) -> list[str]:
    """`path` → sorted .tar files: a directory (its *.tar), a glob, a file, or a comma-separated list of these."""
    files = []
    for part in (p.strip() for p in str(path).split(",") if p.strip()):
        if any(ch in part for ch in "*?["):
            files += sorted(glob.glob(part, recursive=True))
        elif os.path.isdir(part):
            files += sorted(glob.glob(os.path.join(part, "*.tar")))
        elif os.path.isfile(part):
            files.append(part)
    if not files:
        raise FileNotFoundError(f"No .tar shards match data.path={path!r} (a directory, a glob or .tar files).")
    return files


def _tar_samples(shard: str):
    """WebDataset grouping: consecutive members sharing a key (path up to the first dot of the file name)."""
    key, sample = None, {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, _, ext = name.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and sample:
                yield key, sample
                sample = {}
            key = member_key
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _caption_of(layout: str, sample: dict[str, bytes]) -> str | None:
    if layout == "blip3o":
        raw = sample.get("txt")
        return None if raw is None else raw.decode("utf-8", errors="replace")
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return None if caption is None else str(caption)


def _caption_rows(shards: list[str], layout: str):
    """Rows {"__key__", "image" (undecoded or None), "caption" (or None)}; `shards` is what `datasets` splits."""
    for shard in shards:
        name = os.path.basename(shard)
        try:
            for key, sample in _tar_samples(shard):
                image = next((sample[e] for e in _IMAGE_EXTENSIONS if e in sample), None)
                caption = _caption_of(layout, sample)
                yield {"__key__": f"{name}/{key}",
                       "image": None if image is None else {"bytes": image, "path": None},
                       "caption": None if caption is None else caption[:MAX_CAPTION_CHARS]}
        except (tarfile.TarError, OSError, EOFError) as error:  # a truncated shard: keep what was read, go on
            logger.warning("Skipping the rest of shard %s: %s", shard, error)


def _check_captions(shards: list[str], layout: str) -> None:
    """One clear start-up error when the first `_CAPTION_PROBE` samples carry no caption in `layout`."""
    seen, extensions, other_layouts = 0, set(), set()
    for shard in shards:
        try:
            for _, sample in _tar_samples(shard):
                caption = _caption_of(layout, sample)
                if caption and caption.strip():
                    return
                seen += 1
                extensions.update(sample)
                other_layouts.update(name for name in _SHARD_LAYOUTS if (_caption_of(name, sample) or "").strip())
                if seen >= _CAPTION_PROBE:
                    break
        except (tarfile.TarError, OSError, EOFError):
            continue
        if seen >= _CAPTION_PROBE:
            break
    found = ", ".join(f".{e}" for e in sorted(extensions)) or "no readable sample"
    hint = "".join(f" They look like data.source={name!r} shards." for name in sorted(other_layouts))
    raise ValueError(
        f"No caption in the first {seen} samples of the shards starting with {shards[0]!r}: data.source={layout!r} "
        f"expects WebDataset samples {_SHARD_LAYOUTS[layout]}; found members {found}.{hint}"
    )


def load_caption_shards(
    source: str, path: str, max_samples: int | None = None, seed: int = 0, shuffle_buffer_size: int = 1000
) -> datasets.IterableDataset:
    """Stream captioned WebDataset shards (`source` ∈ {gpic, blip3o}) as rows {"__key__", "image", "caption"}.

    Every shard is one `datasets` shard, so ranks and DataLoader workers split them as for `webdataset` (by shard
    when the world size divides the shard count, else by example; workers beyond the shard count idle). For a given
    world size and worker count the order is a function of (seed, epoch) only: shard order and a
    `shuffle_buffer_size` buffer per worker, reseeded by `set_epoch` (≤ 1 keeps the shard order). Raises
    ValueError when the first samples carry no caption.
    """
    if source not in _SHARD_LAYOUTS:
        raise ValueError(f"Unknown captioned shard layout {source!r}; use one of {sorted(_SHARD_LAYOUTS)}.")
    shards = resolve_shards(path)
    _check_captions(shards, source)
    dataset = datasets.IterableDataset.from_generator(
        _caption_rows, gen_kwargs={"shards": shards, "layout": source}, features=_CAPTION_FEATURES
    )
    if max_samples is not None:
        dataset = dataset.take(max_samples)  # before the shuffle: the same subset every epoch
    if shuffle_buffer_size > 1:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


def sample_generator(seed: int, epoch: int, sample_key: int, stream: int = 0) -> torch.Generator:
    """A torch generator determined by (seed, epoch, sample key) alone; `stream` > 0 gives independent ones."""
    entropy = [seed, epoch, sample_key] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TrainTransform:
    """Official train augmentation: short-side bicubic resize → random crop → random horizontal flip → uint8.

    `center_crop=True` is the text-to-image variant (torchvision CenterCrop; only the flip is random)."""

    def __init__(self, image_size: int, random_flip: bool = True, center_crop: bool = False):
        self.image_size = image_size
        self.random_flip = random_flip
        self.center_crop = center_crop

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        image = TF.resize(image.convert("RGB"), self.image_size, interpolation=InterpolationMode.BICUBIC)
        if self.center_crop:
            image = TF.center_crop(image, [self.image_size, self.image_size])
        else:
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

    def __init__(
        self, dataset: datasets.Dataset, image_size: int, random_flip: bool = True, seed: int = 0,
        center_crop: bool = False,
    ):
        self.dataset = dataset
        self.transform = TrainTransform(image_size, random_flip, center_crop)
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


class LabelCaptionDataset(ImageDataset):
    """Map-style captioned dataset from a labelled one: item i → {"pixel_values", "caption", "num_skipped"}.

    The caption is `templates[t].format(nouns[label])` with t drawn from (seed, epoch, i) on its own generator
    stream, so a resumed run sees the same captions; the transform is the t2i one (center crop, random flip).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_size: int,
        nouns: tuple[str, ...] | list[str],
        templates: tuple[str, ...] | list[str],
        random_flip: bool = True,
        seed: int = 0,
    ):
        super().__init__(dataset, image_size, random_flip, seed, center_crop=True)
        self.nouns, self.templates = tuple(nouns), tuple(templates)

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        generator = sample_generator(self.seed, self.epoch, index, stream=1)
        template = int(torch.randint(len(self.templates), (), generator=generator))
        sample["caption"] = self.templates[template].format(self.nouns[sample.pop("label")])
        return sample


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
        center_crop: bool = False,
    ):
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.transform = TrainTransform(image_size, random_flip, center_crop)
        self.seed = seed
        self.epoch = 0
        self.class_names = class_names(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        for position, row in enumerate(self.dataset):
            sample = self._sample(row, row.get("__key__", position))
            if sample is None:
                skipped += 1
                continue
            sample["num_skipped"] = skipped
            skipped = 0
            yield sample

    def _sample(self, row: dict, key) -> dict | None:
        pixel_values = self._pixel_values(row, key)
        return None if pixel_values is None else {"pixel_values": pixel_values, "label": row.get("label", 0)}

    def _pixel_values(self, row: dict, key) -> torch.Tensor | None:
        if row["image"] is None:
            logger.warning("Skipping sample %s without an image", key)
            return None
        try:
            image = decode_image(row["image"])
        except _IMAGE_ERRORS as error:
            logger.warning("Skipping unreadable image %s: %s", key, error)
            return None
        generator = sample_generator(self.seed, self.epoch, zlib.crc32(str(key).encode()))
        return self.transform(image, generator)


class StreamingCaptionDataset(StreamingImageDataset):
    """Streamed captioned images (`load_caption_shards`): {"pixel_values", "caption", "num_skipped"} per sample.

    The t2i transform (center crop, random flip seeded by (seed, epoch, shard/key)); samples without a caption
    are dropped and counted like unreadable images. Rank splitting as in `StreamingImageDataset`.
    """

    def __init__(self, dataset: datasets.IterableDataset, image_size: int, random_flip: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(dataset, image_size, random_flip, seed, rank, world_size, center_crop=True)

    def _sample(self, row: dict, key) -> dict | None:
        caption = row.get("caption")
        if caption is None or not caption.strip():
            logger.warning("Skipping sample %s without a caption", key)
            return None
        pixel_values = self._pixel_values(row, key)
        return None if pixel_values is None else {"pixel_values": pixel_values, "caption": caption}


def collate(samples: list[dict]) -> dict:
    """→ {"pixel_values": uint8 (B, 3, S, S), "labels": int64 (B,) | "captions": list[str], "num_skipped": int64 ()}.

    Captioned samples (a "caption" key) give "captions"; class-labelled ones give "labels"."""
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}
    if "caption" in samples[0]:
        batch["captions"] = [s["caption"] for s in samples]
    else:
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    batch["num_skipped"] = torch.tensor(sum(s["num_skipped"] for s in samples), dtype=torch.int64)
    return batch


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
    shuffle_buffer_size: int = 1000,
) -> ImageDataset | StreamingImageDataset:
    """One call from the `data` config section to a torch dataset ready for `DataLoader(..., collate_fn=collate)`.

    `source` ∈ {fashion-mnist, imagefolder, hub, webdataset} gives class-labelled samples, `source` ∈
    `CAPTION_SOURCES` captioned ones; `shuffle_buffer_size` concerns the streamed caption shards only.
    """
    if source in _SHARD_LAYOUTS:
        if not path:
            raise ValueError(f"Data source {source!r} needs data.path (a directory, glob or list of .tar shards).")
        shards = load_caption_shards(source, path, max_samples, seed, shuffle_buffer_size)
        return StreamingCaptionDataset(shards, image_size, random_flip, seed, rank=rank, world_size=world_size)
    if source == "fashion-mnist-captions":
        dataset = load_image_dataset("fashion-mnist", max_samples=max_samples)
        return LabelCaptionDataset(dataset, image_size, FASHION_MNIST_NOUNS, FASHION_MNIST_CAPTION_TEMPLATES,
                                   random_flip, seed)
    dataset = load_image_dataset(source, path, split=split, max_samples=max_samples, cache_dir=cache_dir)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamingImageDataset(dataset, image_size, random_flip, seed, rank=rank, world_size=world_size)
    return ImageDataset(dataset, image_size, random_flip, seed)
