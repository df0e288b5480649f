"""Representation analysis (paper Table 4 / Figure 5, evaluation spec §5).

Metrics: closed forms, invariances and loop-based float64 references of CKA, the unbiased HSIC (as Song et al.'s
U-statistic), CKNNA (PRH's definition), Moran's I and the FFT high-frequency ratio. End to end: `main([...])` on a
tiny random tokenizer + AR pipeline, a tokenizer-only directory and a tiny random DINOv2 saved to tmp dirs,
checked against a direct computation of a few entries, interrupted and resumed, and fed bad input.
"""

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from gear_hf import GEARConfig, GEARForCausalImageLM, GEARPipeline, GEARTokenizerConfig, GEARTokenizerModel
from gear_hf.evaluation import representation
from gear_hf.evaluation.representation import (
    AnalysisSettings,
    EvalImageDataset,
    ar_hidden_features,
    check_sizes,
    main,
)
from gear_hf.evaluation.similarity import (
    AlignmentKernel,
    check_topk,
    cknna,
    gram,
    high_frequency_ratio,
    hsic_biased,
    hsic_unbiased,
    kernel_cka,
    linear_cka,
    morans_i,
    prepare_features,
)
from gear_hf.training.alignment import DINOv2Teacher
from gear_hf.training.data import load_image_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cka_with_eps(x, y):
    """Kornblith's feature form ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F), with PRH's +1e-6 in the denominator."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return (yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm() + 1e-6)


# ------------------------------------------------------------------------------------------------------- CKA
def test_cka_of_a_set_with_itself_is_one():
    x = randn(50, 7)
    hsic = hsic_biased(gram(x), gram(x))
    torch.testing.assert_close(linear_cka(x, x), hsic / (hsic + 1e-6), rtol=1e-12, atol=0)
    assert abs(linear_cka(x, x).item() - 1) < 1e-6


def test_cka_invariant_to_orthogonal_transforms_isotropic_scaling_and_translation():
    x, y = randn(60, 5, seed=1), randn(60, 9, seed=2) + randn(60, 5, seed=1) @ randn(5, 9, seed=3)
    qx = torch.linalg.qr(randn(5, 5, seed=4)).Q
    qy = torch.linalg.qr(randn(9, 9, seed=5)).Q
    reference = linear_cka(x, y)
    torch.testing.assert_close(linear_cka(3.7 * x @ qx, 0.2 * y @ qy), reference, rtol=1e-7, atol=0)
    torch.testing.assert_close(linear_cka(x + randn(1, 5, seed=6), y), reference, rtol=1e-10, atol=0)
    torch.testing.assert_close(linear_cka(x, x @ qx), linear_cka(x, x), rtol=1e-12, atol=0)
    # The kernel form equals Kornblith's feature form, and the cached-kernel path (Σ HKH ⊙ HLH) equals both.
    torch.testing.assert_close(reference, cka_with_eps(x, y), rtol=1e-10, atol=0)
    cached = kernel_cka(AlignmentKernel.from_features(x, 10), AlignmentKernel.from_features(y, 10))
    torch.testing.assert_close(cached, reference, rtol=1e-12, atol=0)


def test_cka_of_independent_features_vanishes_on_large_n():
    n, d1, d2 = 1500, 4, 6
    value = linear_cka(randn(n, d1, seed=7), randn(n, d2, seed=8)).item()
    # E ‖YcᵀXc‖² ≈ n·d1·d2 and ‖XcᵀXc‖_F ≈ n·sqrt(d1), so E[CKA] ≈ sqrt(d1·d2)/n; 5× leaves > 10 sigma.
    assert 0 <= value < 5 * math.sqrt(d1 * d2) / n


def test_biased_hsic_is_trace_khlh():
    K, L = gram(randn(9, 3, seed=9)), gram(randn(9, 4, seed=10))
    H = np.eye(9) - np.ones((9, 9)) / 9
    expected = np.trace(K.numpy() @ H @ L.numpy() @ H)
    assert hsic_biased(K, L).item() == pytest.approx(expected, rel=1e-12)


def test_unbiased_hsic_equals_the_u_statistic_of_song_et_al():
    """HSIC_u = (m)_4⁻¹ Σ over ordered distinct (i, j, q, r) of K_ij L_ij + K_ij L_qr − 2 K_ij L_iq (Song et al.
    2012, Theorem 3; the symmetrisation over the 4! orders drops out of a sum over all ordered tuples)."""
    m = 7
    K, L = gram(randn(m, 3, seed=11)), gram(randn(m, 2, seed=12))
    k, l = K.tolist(), L.tolist()
    total = sum(k[i][j] * l[i][j] + k[i][j] * l[q][r] - 2 * k[i][j] * l[i][q]
                for i, j, q, r in itertools.permutations(range(m), 4))
    expected = total / (m * (m - 1) * (m - 2) * (m - 3))
    assert hsic_unbiased(K, L).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="n > 3"):
        hsic_unbiased(K[:3, :3], L[:3, :3])


# ----------------------------------------------------------------------------------------------------- CKNNA
def cknna_reference(x, y, topk):
    """PRH `cknna(unbiased=True)` with Python loops and floats: row-wise top-k neighbours (self excluded) in each
    space, the mask of pairs in both, HSIC_u (eq. 5) of the masked kernels, normalised by the self terms."""
    n = len(x)
    K = [[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)]
    L = [[float(np.dot(y[i], y[j])) for j in range(n)] for i in range(n)]

    def neighbours(G):
        return [set(sorted((j for j in range(n) if j != i), key=lambda j: -G[i][j])[:topk]) for i in range(n)]

    def hsic_u(A, B):
        A = [[0.0 if i == j else A[i][j] for j in range(n)] for i in range(n)]
        B = [[0.0 if i == j else B[i][j] for j in range(n)] for i in range(n)]
        trace = sum(A[i][j] * B[j][i] for i in range(n) for j in range(n))
        sum_a, sum_b = sum(map(sum, A)), sum(map(sum, B))
        product = sum(A[i][t] * B[t][j] for i in range(n) for j in range(n) for t in range(n))
        return (trace + sum_a * sum_b / ((n - 1) * (n - 2)) - 2 * product / (n - 2)) / (n * (n - 3))

    def sim(G1, G2, N1, N2):
        mask = [[1.0 if j in N1[i] and j in N2[i] else 0.0 for j in range(n)] for i in range(n)]
        return hsic_u([[mask[i][j] * G1[i][j] for j in range(n)] for i in range(n)],
                      [[mask[i][j] * G2[i][j] for j in range(n)] for i in range(n)])

    nk, nl = neighbours(K), neighbours(L)
    return sim(K, L, nk, nl) / (math.sqrt(sim(K, K, nk, nk) * sim(L, L, nl, nl)) + 1e-6)


def test_cknna_matches_a_loop_reference_of_the_prh_definition():
    x = randn(12, 4, seed=13)
    y = x @ randn(4, 6, seed=14) + 0.7 * randn(12, 6, seed=15)
    for topk in (2, 4, 7):
        expected = cknna_reference(x.numpy(), y.numpy(), topk)
        assert cknna(x, y, topk).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Batched over leading dims = one problem at a time.
    xs, ys = torch.stack([x, x.flip(0)]), torch.stack([y, randn(12, 6, seed=16)])
    torch.testing.assert_close(cknna(xs, ys, 4), torch.stack([cknna(xs[0], ys[0], 4), cknna(xs[1], ys[1], 4)]))


def test_cknna_closed_forms():
    x, y = randn(20, 5, seed=17), randn(20, 3, seed=18)
    kernel = AlignmentKernel.from_features(x, 10)
    torch.testing.assert_close(cknna(x, x, 10), kernel.knn_self / (kernel.knn_self + 1e-6), rtol=1e-12, atol=0)
    # With every other sample a neighbour (k = n − 1) it is the unbiased CKA.
    torch.testing.assert_close(cknna(x, y, 19), linear_cka(x, y, unbiased=True), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="topk >= 2"):
        check_topk(1, 20)
    with pytest.raises(ValueError, match="at least topk \\+ 1 = 21 samples"):
        cknna(x, y, 20)


def test_prepare_features_is_prh_clamp_then_row_normalisation():
    x = randn(2, 30, 8, seed=19).float() * torch.linspace(0.1, 5, 8)
    out = prepare_features(x, 0.95)
    for b in range(2):
        flat = np.sort(np.abs(x[b].numpy()).ravel())
        threshold = flat[int(0.95 * flat.size)]
        expected = np.clip(x[b].numpy(), -threshold, threshold)
        expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(prepare_features(x, 1.0), torch.nn.functional.normalize(x, dim=-1))


# ---------------------------------------------------------------------------------------------- Moran's I
def morans_i_reference(feature_map):
    """The definition with an explicit rook weight matrix (raster cells, no wrap-around)."""
    h, w, d = feature_map.shape
    z = feature_map.reshape(h * w, d) - feature_map.reshape(h * w, d).mean(0)
    W = np.zeros((h * w, h * w))
    for r, c in itertools.product(range(h), range(w)):
        for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                W[r * w + c, (r + dr) * w + c + dc] = 1
    return (h * w / W.sum()) * np.sum(W * (z @ z.T)) / np.sum(z * z)


def checkerboard(h, w, d=1):
    signs = (-1.0) ** (torch.arange(h)[:, None] + torch.arange(w)[None, :])
    return signs[..., None].double() * torch.linspace(0.5, 2.0, d, dtype=torch.float64)


def test_morans_i_closed_forms_and_reference():
    assert morans_i(checkerboard(16, 16, 3)).item() == pytest.approx(-1.0, abs=1e-12)
    ramp = (torch.arange(16.0)[:, None] + torch.arange(16.0)[None, :])[..., None].double()
    assert morans_i(ramp).item() == pytest.approx(morans_i_reference(ramp.numpy()), rel=1e-12)
    assert morans_i(ramp).item() > 0.9
    noise = randn(5, 7, 3, seed=20)  # non-square grid: rows and columns must not be swapped
    assert morans_i(noise).item() == pytest.approx(morans_i_reference(noise.numpy()), rel=1e-12)
    assert morans_i(torch.full((4, 4, 2), 3.0)).item() == 0.0  # no spatial variance: defined as 0


def test_morans_i_vector_form_is_the_variance_weighted_channel_mean():
    x = randn(8, 8, 4, seed=21) * torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    per_channel = torch.stack([morans_i(x[..., c : c + 1]) for c in range(4)])
    variance = (x - x.mean((0, 1))).square().sum((0, 1))
    assert morans_i(x).item() == pytest.approx(((per_channel * variance).sum() / variance.sum()).item(), rel=1e-12)


def test_morans_i_of_white_noise_has_expectation_minus_one_over_n_minus_one():
    values = morans_i(randn(4000, 16, 16, 1, seed=22))
    standard_error = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - (-1 / 255)) < 4 * standard_error


# -------------------------------------------------------------------------------------------- FFT ratio
def high_frequency_reference(feature_map, cutoff=0.25):
    h, w, _ = feature_map.shape
    z = feature_map - feature_map.mean((0, 1))
    power = (np.abs(np.fft.fft2(z, axes=(0, 1))) ** 2).sum(-1)
    fu, fv = np.fft.fftfreq(h), np.fft.fftfreq(w)
    high = total = 0.0
    for u, v in itertools.product(range(h), range(w)):
        radius = math.hypot(fu[u], fv[v])
        total += power[u, v] if radius > 0 else 0.0
        high += power[u, v] if radius > cutoff else 0.0
    return high / total


def test_high_frequency_ratio_closed_forms_and_reference():
    assert high_frequency_ratio(torch.full((16, 16, 3), 3.0)).item() == 0.0
    assert high_frequency_ratio(checkerboard(16, 16, 2)).item() == pytest.approx(1.0, abs=1e-12)
    rows = torch.arange(16.0, dtype=torch.float64)
    low = torch.cos(2 * math.pi * 3 * rows / 16)[:, None, None].expand(16, 16, 1)  # k = 3 ≤ 4 cycles
    assert high_frequency_ratio(low).item() == pytest.approx(0.0, abs=1e-12)
    x = randn(6, 10, 3, seed=23)
    assert high_frequency_ratio(x).item() == pytest.approx(high_frequency_reference(x.numpy()), rel=1e-10)


def test_high_frequency_ratio_of_white_noise_is_the_share_of_high_bins():
    freqs = np.fft.fftfreq(16)
    radii = [math.hypot(a, b) for a in freqs for b in freqs]
    expected = sum(r > 0.25 for r in radii) / sum(r > 0 for r in radii)
    values = high_frequency_ratio(randn(2000, 16, 16, 4, seed=24))
    standard_error = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - expected) < 4 * standard_error


# -------------------------------------------------------------------------------------------- end to end
IMAGE_SIZE, NUM_LAYERS, NUM_IMAGES, CHUNK = 32, 3, 24, 12  # 8x8 tokens (downsample 4), 2 image-level chunks


def tiny_tokenizer(seed):
    torch.manual_seed(seed)
    return GEARTokenizerModel(GEARTokenizerConfig(
        quantizer="vq", codebook_size=64, image_size=IMAGE_SIZE, base_channels=32, channel_multipliers=[1, 1, 2],
        num_res_blocks=1, z_channels=16, codebook_embed_dim=8)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("representation")
    torch.manual_seed(0)
    ar = GEARForCausalImageLM(GEARConfig(vocab_size=64, num_classes=10, hidden_size=64, num_hidden_layers=NUM_LAYERS,
                                         num_attention_heads=4, image_size=IMAGE_SIZE, downsample_factor=4)).eval()
    GEARPipeline(vq_model=tiny_tokenizer(1), transformer=ar).save_pretrained(root / "pipeline")
    tiny_tokenizer(2).save_pretrained(root / "tokenizer")
    ar.save_pretrained(root / "ar_only")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=4, image_size=IMAGE_SIZE)).save_pretrained(root / "dinov2")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, patch_size=8, image_size=IMAGE_SIZE)
                      ).save_pretrained(root / "siglip_coarse")
    return root


def run_main(saved, out, *extra, models=None):
    models = models or [f"gear={saved / 'pipeline'}", f"warmup={saved / 'tokenizer'}"]
    argv = [arg for spec in models for arg in ("--model", spec)]
    argv += ["--teacher-path", str(saved / "dinov2"), "--data", "fashion-mnist", "--num-images", str(NUM_IMAGES),
             "--chunk-size", str(CHUNK), "--batch-size", "8", "--no-progress", "--align-layer", "2",
             "--output-dir", str(out), *extra]
    return main(argv)


@pytest.fixture(scope="module")
def report(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert run_main(saved, out) == 0
    return out, json.loads((out / "representation.json").read_text())


def test_main_writes_json_and_figure(report):
    out, result = report
    assert (out / "representation.png").stat().st_size > 0
    assert not (out / "representation_state.pt").exists()
    config = result["config"]
    assert (config["num_images"], config["grid_size"], config["image_level_chunks"]) == (NUM_IMAGES, 8, 2)
    assert set(result["teacher"]) == {"morans_i", "hf_ratio"}
    assert set(result["models"]) == {"gear", "warmup"} and "ar" not in result["models"]["warmup"]
    metrics = {"cknna_image", "cka_image", "cknna_patch", "cka_patch", "morans_i", "hf_ratio"}
    for entry in result["models"].values():
        assert set(entry["tokenizer"]) == {"pre", "post"}
        for feature in entry["tokenizer"].values():
            assert set(feature) == metrics
            assert all(math.isfinite(s["mean"]) and s["std"] >= 0 for s in feature.values())
            # Biased CKA is a cosine of centred kernels; the ratio is a share of power. (CKNNA's self-normalisation
            # uses other masks, so it has no such bound.)
            assert all(0 <= feature[m]["mean"] <= 1 for m in ("cka_image", "cka_patch", "hf_ratio"))
    ar = result["models"]["gear"]["ar"]
    assert ar["layers"] == list(range(NUM_LAYERS + 1))
    for metric in metrics:
        assert len(ar[metric]["mean"]) == len(ar[metric]["std"]) == NUM_LAYERS + 1


def test_report_values_equal_a_direct_computation(saved, report):
    """Recompute a few entries from the saved models with the metric functions, bypassing the accumulator."""
    _, result = report
    dataset = EvalImageDataset(load_image_dataset("fashion-mnist", None, max_samples=NUM_IMAGES), IMAGE_SIZE)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(NUM_IMAGES)])
    labels = torch.tensor([dataset[i]["label"] for i in range(NUM_IMAGES)])
    teacher = DINOv2Teacher(Dinov2Model.from_pretrained(saved / "dinov2"), grid_size=8)
    tokenizer = GEARTokenizerModel.from_pretrained(saved / "pipeline" / "vq_model").eval()
    ar = GEARForCausalImageLM.from_pretrained(saved / "pipeline" / "transformer").eval()
    with torch.no_grad():
        target = teacher(images)
        x = images.float() / 127.5 - 1
        pre = tokenizer.quant_conv(tokenizer.encoder(x)).flatten(2).transpose(1, 2)
        tokens = tokenizer.encode(x).indices.flatten(1)
        hidden = ar(input_ids=tokens[:, :-1], class_labels=labels, output_hidden_states=True).hidden_states

    def patch_mean(metric, features):
        return torch.stack([metric(prepare_features(f), prepare_features(t)) for f, t in zip(features, target)]).mean()

    # Features are fp32 and the run used batches of 8 (here: one of 24), which changes their last bits.
    tol = 1e-6
    entry = result["models"]["gear"]
    assert entry["tokenizer"]["pre"]["cka_patch"]["mean"] == pytest.approx(patch_mean(linear_cka, pre).item(), tol)
    knn = patch_mean(lambda a, b: cknna(a, b, 10), hidden[2])
    assert entry["ar"]["cknna_patch"]["mean"][2] == pytest.approx(knn.item(), rel=tol)
    chunks = [linear_cka(prepare_features(pre[s : s + CHUNK].mean(1)), prepare_features(target[s : s + CHUNK].mean(1)))
              for s in (0, CHUNK)]
    assert entry["tokenizer"]["pre"]["cka_image"]["mean"] == pytest.approx(torch.stack(chunks).mean().item(), tol)
    morans = morans_i(target.unflatten(1, (8, 8))).mean()
    assert result["teacher"]["morans_i"]["mean"] == pytest.approx(morans.item(), rel=tol)


def test_ar_rows_follow_the_repa_convention(saved):
    ar = GEARForCausalImageLM.from_pretrained(saved / "pipeline" / "transformer").eval()
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([3, 7])
    with torch.no_grad():
        hidden = ar_hidden_features(ar, tokens, labels)
    assert len(hidden) == NUM_LAYERS + 1 and all(h.shape == (2, 64, 64) for h in hidden)
    # Row 0 is the class token (it predicts token 0); row p ≥ 1 embeds token p − 1 (and predicts token p).
    torch.testing.assert_close(hidden[0][:, 0], ar.cls_embedding.embedding_table.weight[labels])
    torch.testing.assert_close(hidden[0][:, 1:], ar.tok_embeddings.weight[tokens[:, :-1]])


def test_interrupted_run_resumes_to_the_same_report(saved, report, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = representation.RepresentationStats.add_batch

    def interrupt_on_second_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(representation.RepresentationStats, "add_batch", interrupt_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_main(saved, tmp_path, "--save-every", "1")
    monkeypatch.setattr(representation.RepresentationStats, "add_batch", original)
    state = torch.load(tmp_path / "representation_state.pt", weights_only=True)
    assert state["images_done"] == 8
    assert run_main(saved, tmp_path, "--topk", "5") == 2
    assert "holds a partial analysis of another configuration" in capsys.readouterr().err
    assert run_main(saved, tmp_path, "--save-every", "1") == 0
    assert json.loads((tmp_path / "representation.json").read_text()) == report[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "48"], "use --image-size 32"),
        (["--image-size", "30"], "not a multiple of the 'gear' tokenizer's downsample factor 4"),
        (["--num-images", "8"], "needs at least 11 images per chunk"),
        (["--teacher", "siglip2", "--teacher-path", "{siglip_coarse}"], "patch grid does not match the 8x8"),
        (["--teacher-path", "/no/such/dinov2"], "--teacher-path /no/such/dinov2: no such file"),
    ],
)
def test_bad_input_gives_one_clear_error(saved, tmp_path, capsys, extra, message):
    extra = [arg.format(siglip_coarse=saved / "siglip_coarse") for arg in extra]
    assert run_main(saved, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("representation: error:") and message in "\n".join(err)


def test_missing_or_incomplete_weights_give_one_clear_error(saved, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(saved / "pipeline", broken)
    for weights in (broken / "vq_model").glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "empty").mkdir()
    cases = [
        (f"gear={tmp_path / 'missing'}", "no such directory"),
        (f"gear={tmp_path / 'empty'}", "no GEAR weights found"),
        (f"gear={broken}", "Could not load the 'gear' tokenizer"),
        (f"gear={saved / 'ar_only'}", "is an AR model alone"),
        ("gear", "--model expects NAME=PATH"),
    ]
    for spec, message in cases:
        assert run_main(saved, tmp_path / "out", models=[spec]) == 2
        assert message in capsys.readouterr().err


def test_check_sizes():
    settings = AnalysisSettings(topk=10, chunk_size=1024)
    assert check_sizes(50, 16, settings) == 50  # fewer images than a chunk: one chunk of all
    assert check_sizes(5000, 16, settings) == 1024
    with pytest.raises(ValueError, match="needs at least 11 patches per image, but the token grid is 3x3"):
        check_sizes(100, 3, settings)
    with pytest.raises(ValueError, match="--topk must be >= 2"):
        check_sizes(100, 16, AnalysisSettings(topk=1))
