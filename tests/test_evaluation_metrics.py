"""Evaluation metrics without pretrained weights: closed forms, invariances, brute-force references and the
reference implementations installed here (torch-fidelity, scikit-image) — the CPU part of the validation checklist."""

import math
import warnings
import zipfile

import numpy as np
import pytest
import torch

from gear_hf.evaluation import adm, frechet, sampler
from gear_hf.evaluation.codebook import codebook_report
from gear_hf.evaluation.frechet import FIDStatistics, frechet_distance, frechet_distance_stats
from gear_hf.evaluation.inception import check_uint8_images, tf1_resize_bilinear
from gear_hf.evaluation.npz import npz_array_info
from gear_hf.evaluation.text_to_image import clip_score_summary, coco_preprocess, polynomial_mmd, prdc
from gear_hf.evaluation.tokenizer_metrics import psnr_l1_ssim, ssim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_identity_and_diagonal_closed_form():
    x = rng().standard_normal((300, 16))
    s = FIDStatistics.from_features(x)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8
    mu1, mu2 = rng(1).standard_normal(16), rng(2).standard_normal(16)
    a, b = rng(3).uniform(0.1, 3, 16), rng(4).uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in frechet.FD_METHODS:
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n1,n2", [(400, 300), (20, 300), (300, 25), (20, 30)])
def test_frechet_sqrtm_eigh_and_low_rank_routes_agree(n1, n2):
    x = rng(n1).standard_normal((n1, 64)).astype(np.float32)
    y = (rng(n2).standard_normal((n2, 64)) * 1.3 + 0.2).astype(np.float32)
    s1, s2 = FIDStatistics.from_features(x), FIDStatistics.from_features(y)
    assert (s1.factor is not None) == (n1 <= 64)  # the fast route only for rank-deficient covariances
    reference = frechet_distance_stats(s1, s2, method="sqrtm")[0]
    low_rank = frechet_distance_stats(s1, s2, method="eigh")[0]
    full = frechet_distance_stats(FIDStatistics(s1.mu, s1.sigma), FIDStatistics(s2.mu, s2.sigma), method="eigh")[0]
    assert low_rank == pytest.approx(reference, rel=1e-6) and full == pytest.approx(reference, rel=1e-6)
    # ADM statistics: float32 mean, float64 N-1 covariance
    assert s1.mu.dtype == np.float32 and s1.sigma.dtype == np.float64
    np.testing.assert_allclose(s1.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_frechet_eps_fallback_and_bad_statistics(monkeypatch):
    x, y = rng(0).standard_normal((50, 8)), rng(1).standard_normal((50, 8))
    s1, s2 = FIDStatistics.from_features(x), FIDStatistics.from_features(y)
    exact = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    real_sqrtm, calls = frechet._sqrtm, []

    def singular_first(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(frechet, "_sqrtm", singular_first)
    with pytest.warns(RuntimeWarning, match="adding 1e-06 to the diagonal"):
        retried = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    offset = np.eye(8) * 1e-6
    np.testing.assert_allclose(calls[1], (s1.sigma + offset) @ (s2.sigma + offset))
    assert retried == pytest.approx(exact, rel=1e-4)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(s1.mu, s1.sigma, s1.mu[:4], s1.sigma[:4, :4])
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(s1.mu * np.nan, s1.sigma, s2.mu, s2.sigma)


# ------------------------------------------------------------------------------------------------ Inception Score
def _probs_from_logits(logits):
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), -1).numpy()


def test_inception_score_closed_forms_and_contiguous_splits():
    assert adm.inception_score(np.full((100, 10), 0.1, np.float32)) == pytest.approx(1.0, abs=1e-6)
    k = 8
    sharp = np.eye(k)[np.arange(400) % k] * 40.0  # K equally frequent, near one-hot (no exact zeros)
    assert adm.inception_score(_probs_from_logits(sharp)) == pytest.approx(k, rel=1e-3)
    # Splits follow file order: a first split of one class, a second of K classes -> mean of 1 and K.
    ordered = np.concatenate([np.eye(k)[np.zeros(48, int)], np.eye(k)[np.arange(48) % k]]) * 40.0
    assert adm.inception_score(_probs_from_logits(ordered), split_size=48) == pytest.approx((1 + k) / 2, rel=1e-3)


def test_inception_score_matches_torch_fidelity_without_shuffle():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = rng().standard_normal((600, 50)) * 3
    ours = adm.inception_score(_probs_from_logits(logits), split_size=200)
    theirs = isc_features_to_metric(torch.as_tensor(logits), splits=3, shuffle=False)["inception_score_mean"]
    assert ours == pytest.approx(theirs, rel=1e-5)


# ------------------------------------------------------------------------------------------------ precision / recall
def _brute_force_pr(ref, samples, k=3):
    d = ((ref[:, None, :] - samples[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), axis=1)[:, k]
    r_s = np.sort(((samples[:, None] - samples[None]) ** 2).sum(-1), axis=1)[:, k]
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_s[None, :]).any(1).mean()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_precision_recall_against_brute_force(dtype):
    g = rng(5)
    ref = np.concatenate([g.normal(0, 1, (60, 2)), g.normal(6, 1, (40, 2))]).astype(np.float32)
    samples = np.concatenate([g.normal(0.5, 1.2, (70, 2)), g.normal(12, 1, (30, 2))]).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), samples.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert adm.precision_recall(ref, samples, distance_dtype=dtype) == pytest.approx(expected)
    # ADM's blocking (here 16 × 32 blocks) does not change the result
    assert adm.precision_recall(ref, samples, distance_dtype=dtype, row_batch_size=16,
                                col_batch_size=32) == pytest.approx(expected)
    assert adm.precision_recall(ref, ref, distance_dtype=dtype) == (1.0, 1.0)


def test_precision_recall_matches_torch_fidelity_and_fp16_overflow_falls_back():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = rng(6)
    ref, samples = g.normal(0, 1, (80, 16)).astype(np.float32), g.normal(0.3, 1.1, (90, 16)).astype(np.float32)
    theirs = calculate_precision_recall_full(torch.from_numpy(samples), torch.from_numpy(ref))  # (gen, real)
    assert adm.precision_recall(ref, samples, distance_dtype="float32") == pytest.approx(theirs, abs=1e-7)  # fp32 mean
    big = torch.from_numpy(ref * 1e3)  # squared norms ~1e7 overflow fp16 -> the fp32 path, as ADM's tf.cond
    assert torch.isfinite(adm.pairwise_squared_distances(big, big, "float16")).all()
    assert torch.equal(adm.pairwise_squared_distances(big, big, "float16"),
                       adm.pairwise_squared_distances(big, big, "float32"))
    with pytest.raises(ValueError, match="at least k \\+ 1 = 4"):
        adm.precision_recall(ref[:3], samples)


# ------------------------------------------------------------------------------------------------ PRDC and MMD
def test_prdc_against_float64_brute_force_and_self():
    g = rng(7)
    real, fake = g.standard_normal((300, 32)), g.standard_normal((250, 32))
    k = 5
    d = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))
    real_nn = np.sort(np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1)), 1)[:, k]
    fake_nn = np.sort(np.sqrt(((fake[:, None] - fake[None]) ** 2).sum(-1)), 1)[:, k]
    expected = {"precision": (d < real_nn[:, None]).any(0).mean(), "recall": (d < fake_nn[None]).any(1).mean(),
                "density": (d < real_nn[:, None]).sum(0).mean() / k, "coverage": (d.min(1) < real_nn).mean()}
    got = prdc(real, fake, k=k, chunk=64)
    assert got == pytest.approx(expected, abs=1e-12)
    same = prdc(real, real, k=k)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_polynomial_mmd_matches_double_loop_and_vanishes_on_one_set():
    g = rng(8)
    x, y = g.standard_normal((5, 4)), g.standard_normal((5, 4)) + 0.5
    kernel = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = 5
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert polynomial_mmd(x, y, n_subsets=1, subset_size=5)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # two independent sets of one distribution: the unbiased estimator averages to ~0
    feats1, feats2 = g.standard_normal((2000, 8)), g.standard_normal((2000, 8))
    values = polynomial_mmd(feats1, feats2, n_subsets=20, subset_size=100, seed=1)
    assert abs(values.mean()) < 3 * values.std() / math.sqrt(20)
    np.testing.assert_array_equal(values, polynomial_mmd(feats1, feats2, n_subsets=20, subset_size=100, seed=1))
    shifted = polynomial_mmd(feats1, feats2 + 1.0, n_subsets=20, subset_size=100, seed=1)
    assert shifted.mean() > 10 * values.std()


# ------------------------------------------------------------------------------------------------ resizers
def test_tf1_resize_matches_torch_fidelity_and_differs_from_torch_bilinear():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ramp = torch.linspace(0, 255, 256).view(1, 1, 1, 256).expand(2, 3, 256, 256).contiguous()
    images = torch.cat([ramp, torch.randint(0, 256, (2, 3, 256, 256)).float()])
    ours = tf1_resize_bilinear(images, 299)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    assert (ours - theirs).abs().max() <= 1e-5
    torch_bilinear = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_bilinear).abs().max() > 1.0  # a different mapping: the two must not be mixed
    # TF1 maps output o to input o·in/out: the first row/column is copied exactly
    assert torch.equal(ours[..., 0, 0], images[..., 0, 0])


# ------------------------------------------------------------------------------------------------ SSIM / PSNR / L1
def test_ssim_matches_scikit_image_and_psnr_l1_closed_forms():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 3, 24, 20, generator=g)
    recon = (gt + 0.1 * torch.randn(3, 3, 24, 20, generator=g)).clamp(0, 1)
    ours = ssim(gt, recon)
    theirs = [structural_similarity(gt[i].numpy(), recon[i].numpy(), channel_axis=0, data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)
    offset = (gt * 0.5 + 0.25, gt * 0.5 + 0.25 + 0.1)  # constant error 0.1: MSE 0.01, PSNR 20 dB, L1 0.1
    stats = psnr_l1_ssim(offset[1], offset[0])
    assert stats["psnr"] == pytest.approx(20.0, abs=1e-4) and stats["l1"] == pytest.approx(0.1, abs=1e-6)


# ------------------------------------------------------------------------------------------------ codebook
def test_codebook_report_closed_forms():
    counts = torch.tensor([6, 2, 2, 0, 0, 0, 0, 0])
    p = np.array([0.6, 0.2, 0.2])
    entropy = -(p * np.log(p)).sum()
    report = codebook_report(counts, top_k=(1, 2, 10))
    assert report["usage"] == pytest.approx(3 / 8) and report["dead_codes"] == 5
    assert report["usage_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert report["effective_size"] == pytest.approx(math.exp(entropy), rel=1e-6)
    assert report["usage_top1_mass"] == pytest.approx(0.6) and report["usage_top2_mass"] == pytest.approx(0.8)
    assert report["usage_top10_mass"] == pytest.approx(1.0) and report["num_tokens"] == 10


# ------------------------------------------------------------------------------------------------ labels and seeds
def test_class_labels_and_image_seeds_depend_only_on_the_index():
    uniform = sampler.class_labels_for(1000, 10, seed=3)
    assert np.array_equal(uniform, sampler.class_labels_for(1000, 10, seed=3))
    assert not np.array_equal(uniform, sampler.class_labels_for(1000, 10, seed=4))
    balanced = sampler.class_labels_for(1005, 10, seed=3, mode="balanced")
    assert set(np.bincount(balanced, minlength=10)) == {100, 101}
    assert not np.array_equal(balanced[:10], np.arange(10))  # shuffled: no class structure in the IS splits
    seeds = [sampler.image_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    with pytest.raises(ValueError, match="label mode"):
        sampler.class_labels_for(10, 10, mode="stratified")


# ------------------------------------------------------------------------------------------------ COCO / CLIP
def test_coco_preprocess_and_clip_score_definitions():
    from PIL import Image

    image = Image.fromarray(rng().integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = coco_preprocess(image, 256)
    assert out.size == (256, 256)
    resized = image.resize((max(256, round(500 * 256 / 300)), 256), Image.BICUBIC)
    left = (resized.width - 256) // 2
    assert np.array_equal(np.asarray(out), np.asarray(resized)[:, left:left + 256])
    square = Image.fromarray(rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(coco_preprocess(square)), np.asarray(square))
    summary = clip_score_summary(np.array([0.3, -0.1]))
    assert summary["clip_score"] == pytest.approx(10.0)  # GEAR: 100 · mean cos, no clamp
    assert summary["clip_score_hessel"] == pytest.approx(2.5 * 0.15)
    assert summary["clip_score_torchmetrics"] == pytest.approx(15.0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_images_and_files_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="must be uint8 in \\[0, 255\\].*to_uint8"):
        check_uint8_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        check_uint8_images(np.zeros((2, 3, 8, 8), np.uint8))
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="dtype float32; samples must be uint8"):
        adm.check_sample_batch(floats)
    wrong_key = tmp_path / "wrong_key.npz"
    np.savez(wrong_key, images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match="no 'arr_0' array"):
        adm.check_sample_batch(wrong_key)
    not_a_reference = tmp_path / "ref.npz"
    np.savez(not_a_reference, labels=np.zeros(4))
    with pytest.raises(ValueError, match="neither images \\(arr_0\\) nor statistics"):
        adm.load_reference_batch(not_a_reference)
    half = tmp_path / "half.npz"
    np.savez(half, mu=np.zeros(4))
    with pytest.raises(ValueError, match="only one of 'mu' / 'sigma'"):
        adm.load_reference_batch(half)
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        adm.check_sample_batch(text)
    v3 = tmp_path / "v3.npz"
    with zipfile.ZipFile(v3, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array(member, np.zeros((2, 8, 8, 3), np.uint8), version=(3, 0))
    with pytest.raises(ValueError, match="unsupported .npy format 3.0"):
        npz_array_info(v3)


def test_small_sets_warn_or_fail():
    ref = FIDStatistics.from_features(rng(0).standard_normal((50, 8)))
    with pytest.warns(UserWarning, match="biased high"):
        value = adm.fid_of_samples(rng(1).standard_normal((30, 8)), ref)
    assert value > 0
    with pytest.raises(ValueError, match="N >= 2"):
        adm.fid_of_samples(rng(1).standard_normal((1, 8)), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adm.fid_of_samples(rng(1).standard_normal((2048, 8)), ref)  # no warning at the threshold


# ------------------------------------------------------------------------------------------------ ADM pipeline wiring
class FakeExtractor:
    """Stands in for InceptionExtractor: deterministic 'features' of uint8 images, counting the images it sees."""

    batch_size, weights_path, has_classifier, device = 7, None, True, "cpu"

    def __init__(self):
        self.seen = 0

    def adm_features(self, batches, desc=""):
        images = np.concatenate([np.asarray(b) for b in batches]).astype(np.float32) / 255
        self.seen += len(images)
        flat = images.reshape(len(images), -1)
        pool = np.tile(flat[:, :16], (1, 4))[:, :40]
        logits = flat[:, :10] * 20
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return {"pool": pool, "spatial": flat[:, :12], "probs": probs.astype(np.float32)}


def test_evaluate_sample_batch_composes_the_adm_metrics(tmp_path):
    g = rng(9)
    samples, reference = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=g.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8))
    np.savez(reference, arr_0=g.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8))
    extractor = FakeExtractor()
    result = adm.evaluate_sample_batch(samples, reference, extractor, cache_dir=str(tmp_path / "cache"))
    s_acts = FakeExtractor().adm_features([np.load(samples)["arr_0"]])
    r_acts = FakeExtractor().adm_features([np.load(reference)["arr_0"]])
    fs = lambda a: FIDStatistics.from_features(a)  # noqa: E731
    expected = {"fid": frechet_distance(fs(s_acts["pool"]).mu, fs(s_acts["pool"]).sigma,
                                        fs(r_acts["pool"]).mu, fs(r_acts["pool"]).sigma),
                "sfid": frechet_distance(fs(s_acts["spatial"]).mu, fs(s_acts["spatial"]).sigma,
                                         fs(r_acts["spatial"]).mu, fs(r_acts["spatial"]).sigma),
                "inception_score": adm.inception_score(s_acts["probs"])}
    expected["precision"], expected["recall"] = adm.precision_recall(r_acts["pool"], s_acts["pool"])
    assert result == pytest.approx(expected, rel=1e-9)
    assert extractor.seen == 50
    # the reference activations are cached: a second evaluation only extracts the samples
    again = adm.evaluate_sample_batch(samples, reference, extractor, cache_dir=str(tmp_path / "cache"))
    assert again == result and extractor.seen == 80
    # stored statistics win over arr_0 for FID (ADM's read_statistics), and are what the loader returns
    stored = FIDStatistics.from_features(g.standard_normal((100, 40)))
    np.savez(reference, arr_0=np.load(reference)["arr_0"], mu=stored.mu, sigma=stored.sigma)
    loaded = adm.load_reference_statistics(reference)
    assert np.array_equal(loaded.mu, stored.mu) and np.array_equal(loaded.sigma, stored.sigma)
    with_stats = adm.evaluate_sample_batch(samples, reference, extractor, metrics=("fid",))
    assert with_stats["fid"] == pytest.approx(frechet_distance(fs(s_acts["pool"]).mu, fs(s_acts["pool"]).sigma,
                                                               stored.mu, stored.sigma))
    spatial = adm.load_reference_statistics(reference, extractor, cache_dir=str(tmp_path / "c2"), spatial=True)
    np.testing.assert_allclose(spatial.sigma, fs(r_acts["spatial"]).sigma)


def test_inception_extraction_stays_fp32_under_training_autocast():
    from gear_hf.evaluation.inception import FIDInceptionV3, InceptionExtractor

    extractor = InceptionExtractor(model=FIDInceptionV3().eval(), progress=False)
    images = rng(10).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    plain = extractor.adm_features(images)["pool"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.array_equal(extractor.adm_features(images)["pool"], plain)


def test_missing_pretrained_networks_name_the_option(tmp_path):
    from gear_hf.evaluation.text_to_image import CLIPScorer, DINOv2Extractor

    with pytest.raises(FileNotFoundError, match="Pass --dinov2 with a local directory"):
        DINOv2Extractor.from_pretrained(str(tmp_path / "no-dinov2"))
    with pytest.raises(FileNotFoundError, match="Pass --clip with a local directory"):
        CLIPScorer.from_pretrained(str(tmp_path / "no-clip"))


def test_atomic_writes_keep_the_suffix_for_format_inference(tmp_path):
    from PIL import Image

    from gear_hf.evaluation.files import save_atomically, savez_atomically

    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_atomically(Image.fromarray(image).save, tmp_path / "a.png")  # PIL picks PNG from the temp name's suffix
    savez_atomically(tmp_path / "shard", images=image)  # no .npz suffix: np.savez must not append one
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)
    np.testing.assert_array_equal(np.load(tmp_path / "shard")["images"], image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "shard"]


def test_truncated_unreadable_empty_and_too_small_inputs_are_named(tmp_path):
    from gear_hf.evaluation.npz import iter_npz_batches
    from gear_hf.evaluation.tokenizer_metrics import EvalImages, EvalTransform, reconstruction_metrics

    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(truncated, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (4, 8, 8, 3)})
        member.write(bytes(3 * 8 * 8 * 3))  # three of the four images
    with pytest.raises(ValueError, match="arr_0 is truncated"):
        list(iter_npz_batches(truncated, batch_size=2))
    rows = [{"image": {"path": "broken.png", "bytes": b"not an image"}}]
    with pytest.raises(ValueError, match="Cannot read evaluation image broken.png"):
        list(EvalImages(rows, EvalTransform(8)))
    tokenizer = torch.nn.Module()
    tokenizer.check_input_range = True
    with pytest.raises(ValueError, match="The evaluation set is empty"):
        reconstruction_metrics(tokenizer, [], progress=False)
    assert tokenizer.check_input_range and tokenizer.training  # restored after the failure
    one, reference = tmp_path / "one.npz", tmp_path / "ref.npz"
    np.savez(one, arr_0=rng(3).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8))
    np.savez(reference, arr_0=rng(4).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="FID needs at least 2 samples"):
        adm.evaluate_sample_batch(one, reference, FakeExtractor(), metrics=("fid",))
