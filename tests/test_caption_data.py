"""Captioned training images: GPIC- and BLIP3o-layout WebDataset shards written from real photos (scikit-image's
bundled images with their docstring captions) and real Fashion-MNIST images, and the Fashion-MNIST caption set."""

import collections
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from gear_hf.training.config import TrainingConfig
from gear_hf.training.data import (
    FASHION_MNIST_CAPTION_TEMPLATES,
    FASHION_MNIST_NOUNS,
    MAX_CAPTION_CHARS,
    ImageDataset,
    LabelCaptionDataset,
    StreamingCaptionDataset,
    build_train_dataset,
    collate,
    fashion_mnist_caption,
    fashion_mnist_dataset,
    load_image_dataset,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Landscape, portrait, square, gray and colour photos: the center crop is exercised along both axes.
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "moon", "cell", "clock", "page", "brick",
          "immunohistochemistry"]
SIZE = 31  # odd: crop offsets such as (46 - 31) / 2 = 7.5 exercise torchvision's rounding


def _photo(name: str) -> tuple[Image.Image, str]:
    loader = getattr(skdata, name)
    return Image.fromarray(loader()), loader.__doc__.split("\n\n")[0].strip()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _valid_pool() -> list[tuple[bytes, str, str]]:
    """(image bytes, extension, unique caption) of real images: the skimage photos, then Fashion-MNIST ones."""
    pool = []
    for i, name in enumerate(PHOTOS):
        image, caption = _photo(name)
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        pool.append((_encode(image.convert("RGB") if fmt == "JPEG" else image, fmt), fmt.lower().replace("jpeg", "jpg"),
                     caption))
    fashion = fashion_mnist_dataset()
    for i in range(12):
        row = fashion[i]
        pool.append((_encode(row["image"], "PNG"), "png", f"{fashion_mnist_caption(row['label'], i % 5)} (#{i})"))
    return pool


def _write_shards(directory, layout: str, n_shards: int) -> dict:
    """Shards with every valid sample of the pool plus, mid-shard, bad ones; returns what a reader must produce."""
    pool = _valid_pool()
    truncated_jpeg = _encode(_photo("chelsea")[0], "JPEG")[:2000]
    long_caption = "a very long caption " * 300
    meta = lambda caption: json.dumps({"caption": caption, "caption_type": "short"}).encode()  # noqa: E731
    caption_member = (lambda c: ("json", meta(c))) if layout == "gpic" else (lambda c: ("txt", c.encode()))
    bad = [  # (members, why) — each is skipped and counted
        ([caption_member("a truncated photo of a cat"), ("jpg", truncated_jpeg)], "corrupt image"),
        ([("json", json.dumps({"caption_type": "tag"}).encode()) if layout == "gpic" else ("cls", b"3"),
          ("jpg", pool[0][0])], "no caption"),
        ([caption_member("   "), ("png", pool[1][0])], "empty caption"),
        ([caption_member("a caption without its image")], "no image"),
    ]
    expected, shards = [], [[] for _ in range(n_shards)]
    for i, (payload, ext, caption) in enumerate(pool):
        shards[i % n_shards].append(([caption_member(caption), (ext, payload)], caption))
    shards[0].append(([caption_member(long_caption), ("png", pool[2][0])], long_caption[:MAX_CAPTION_CHARS]))
    for j, (members, _) in enumerate(bad):
        shards[j % n_shards].insert(1, (members, None))  # never last in a shard: its count lands on a sample
    paths, pixels = [], {}
    for s, samples in enumerate(shards):
        path = directory / f"{layout}-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k, (members, caption) in enumerate(samples):
                for ext, payload in members:
                    _add(tar, f"{s:02d}{k:04d}.{ext}", payload)
                if caption is not None:
                    expected.append(caption)
                    image_bytes = next(p for e, p in members if e in ("jpg", "png"))
                    pixels[caption] = image_bytes
        paths.append(str(path))
    return {"dir": str(directory), "shards": paths, "captions": expected, "pixels": pixels, "num_bad": len(bad),
            "per_shard": [[c for _, c in samples if c is not None] for samples in shards]}


@pytest.fixture(scope="module")
def gpic(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("gpic"), "gpic", 4)


@pytest.fixture(scope="module")
def blip3o(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("blip3o"), "blip3o", 2)


def _t2i_views(image_bytes: bytes, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official t2i transform computed directly with PIL: (unflipped, flipped) uint8 (3, size, size)."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    assert min(new_w, new_h) == size and abs(max(new_w, new_h) - max(width, height) * scale) < 1
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    image = image.crop((left, top, left + size, top + size))
    as_tensor = lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # noqa: E731
    return as_tensor(image), as_tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def _loader(dataset, batch_size=2, num_workers=0):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)


def _batches(dataset, epoch, **kwargs):
    dataset.set_epoch(epoch)
    return [(batch["pixel_values"], batch["captions"]) for batch in _loader(dataset, **kwargs)]


# ------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("layout", ["gpic", "blip3o"])
def test_shards_decode_with_t2i_transform_and_count_skips(layout, request):
    shards = request.getfixturevalue(layout)
    dataset = build_train_dataset(layout, shards["dir"], SIZE, seed=0, shuffle_buffer_size=0)
    assert isinstance(dataset, StreamingCaptionDataset)
    samples = list(dataset)
    assert [s["caption"] for s in samples] == shards["captions"]  # shard order, bad samples dropped
    assert sum(s["num_skipped"] for s in samples) == shards["num_bad"]
    flips = []
    for sample in samples:
        assert sample["pixel_values"].dtype == torch.uint8 and sample["pixel_values"].shape == (3, SIZE, SIZE)
        plain, flipped = _t2i_views(shards["pixels"][sample["caption"]], SIZE)
        assert torch.equal(sample["pixel_values"], plain) or torch.equal(sample["pixel_values"], flipped)
        flips.append(not torch.equal(sample["pixel_values"], plain))
    assert any(flips) and not all(flips)
    long = [s["caption"] for s in samples if len(s["caption"]) == MAX_CAPTION_CHARS]
    assert len(long) == 1  # pre-truncated to the official 4000 characters


def test_collate_captions_and_labels(gpic):
    batch = next(iter(_loader(build_train_dataset("gpic", gpic["dir"], SIZE, shuffle_buffer_size=0), 3)))
    assert set(batch) == {"pixel_values", "captions", "num_skipped"}
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["captions"] == gpic["captions"][:3] and batch["num_skipped"].dtype == torch.int64
    labelled = ImageDataset(load_image_dataset("fashion-mnist", max_samples=3), image_size=SIZE)
    batch = next(iter(_loader(labelled, 3)))
    assert set(batch) == {"pixel_values", "labels", "num_skipped"}
    assert batch["labels"].tolist() == [labelled.dataset[i]["label"] for i in range(3)]


def test_max_samples_limits_the_stream(gpic):
    dataset = build_train_dataset("gpic", gpic["dir"], SIZE, max_samples=5, shuffle_buffer_size=0)
    samples = list(dataset)
    assert len(samples) + sum(s["num_skipped"] for s in samples) <= 5 and samples


# ------------------------------------------------------------------------------- order, sharding and resume
@pytest.mark.parametrize("n_shards", [4, 3])  # 4 shards split by shard over 2 ranks; 3 by example
def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(gpic, n_shards):
    path = ",".join(gpic["shards"][:n_shards])
    expected = [c for shard in gpic["per_shard"][:n_shards] for c in shard]
    seen = collections.Counter()
    for rank in range(2):
        dataset = build_train_dataset("gpic", path, SIZE, seed=1, rank=rank, world_size=2, shuffle_buffer_size=4)
        for _, captions in _batches(dataset, epoch=1, batch_size=1, num_workers=2):
            seen.update(captions)
    assert seen == collections.Counter(expected)


def test_order_depends_on_seed_and_epoch_only_and_resume_is_exact(gpic):
    def fresh():
        return build_train_dataset("gpic", gpic["dir"], SIZE, seed=3, shuffle_buffer_size=8)

    first = _batches(fresh(), epoch=2, num_workers=2)
    again = _batches(fresh(), epoch=2, num_workers=2)
    assert [c for _, c in first] == [c for _, c in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    other_epoch = [c for _, captions in _batches(fresh(), epoch=3, num_workers=2) for c in captions]
    assert other_epoch != [c for _, captions in first for c in captions]
    assert sorted(other_epoch) == sorted(gpic["captions"])
    # The trainer's streaming resume: re-create the iterator for the epoch, drop the batches already consumed.
    consumed = 3
    resumed = fresh()
    resumed.set_epoch(2)
    iterator = iter(_loader(resumed, num_workers=2))
    for _ in range(consumed):
        next(iterator)
    rest = [(b["pixel_values"], b["captions"]) for b in iterator]
    assert [c for _, c in rest] == [c for _, c in first[consumed:]]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, first[consumed:]))


# ----------------------------------------------------------------------------------------------- errors
def test_shards_without_captions_fail_at_start_up(tmp_path, blip3o):
    image = _encode(_photo("coffee")[0], "JPEG")
    with tarfile.open(tmp_path / "labels-00000.tar", "w") as tar:
        for k in range(3):
            _add(tar, f"{k:04d}.jpg", image)
            _add(tar, f"{k:04d}.cls", b"1")
    with pytest.raises(ValueError, match=r"No caption in the first 3 samples of .*labels-00000\.tar.*"
                                         r"data\.source='gpic' expects .*\{key\}\.json with a \"caption\" field"
                                         r".*found members \.cls, \.jpg\.$"):
        build_train_dataset("gpic", str(tmp_path), SIZE)
    with pytest.raises(ValueError, match=r"data.source='gpic' expects.*They look like data\.source='blip3o' shards"):
        build_train_dataset("gpic", blip3o["dir"], SIZE)
    with pytest.raises(FileNotFoundError, match="No .tar shards match data.path="):
        build_train_dataset("blip3o", str(tmp_path / "nothing-*.tar"), SIZE)
    with pytest.raises(ValueError, match="needs data.path"):
        build_train_dataset("gpic", None, SIZE)


def test_config_accepts_caption_sources():
    cfg = TrainingConfig.from_dict({"data": {"source": "blip3o", "path": "shards/", "shuffle_buffer_size": 64}})
    assert cfg.data.source == "blip3o" and cfg.data.shuffle_buffer_size == 64
    assert TrainingConfig.from_dict({"data": {"source": "fashion-mnist-captions"}}).data.path is None


# ----------------------------------------------------------------------------------- Fashion-MNIST captions
def test_fashion_mnist_captions():
    dataset = build_train_dataset("fashion-mnist-captions", None, SIZE, seed=0)
    raw = fashion_mnist_dataset()
    assert isinstance(dataset, LabelCaptionDataset) and len(dataset) == len(raw)
    indices = range(0, 4000, 40)
    dataset.set_epoch(0)
    items = [dataset[i] for i in indices]
    used, flips = set(), []
    for i, item in zip(indices, items):
        label = raw[i]["label"]
        choices = [fashion_mnist_caption(label, t) for t in range(len(FASHION_MNIST_CAPTION_TEMPLATES))]
        assert item["caption"] in choices and FASHION_MNIST_NOUNS[label] in item["caption"]
        used.add(choices.index(item["caption"]))
        plain, flipped = _t2i_views(_encode(raw[i]["image"], "PNG"), SIZE)
        assert torch.equal(item["pixel_values"], plain) or torch.equal(item["pixel_values"], flipped)
        flips.append(not torch.equal(item["pixel_values"], plain))
    assert used == set(range(len(FASHION_MNIST_CAPTION_TEMPLATES))) and any(flips) and not all(flips)
    again = build_train_dataset("fashion-mnist-captions", None, SIZE, seed=0)  # resume: same (seed, epoch, index)
    again.set_epoch(0)
    assert [again[i]["caption"] for i in indices] == [item["caption"] for item in items]
    assert all(torch.equal(again[i]["pixel_values"], item["pixel_values"]) for i, item in zip(indices, items))
    dataset.set_epoch(1)
    assert [dataset[i]["caption"] for i in indices] != [item["caption"] for item in items]
    assert fashion_mnist_caption(7) == "a photo of a sneaker" and fashion_mnist_caption(9, 0) == "an ankle boot"
    batch = next(iter(_loader(dataset, 4)))
    assert len(batch["captions"]) == 4 and batch["pixel_values"].shape == (4, 3, SIZE, SIZE)
