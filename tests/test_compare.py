"""scripts/reproduce.py: the ablation arms from one warm-up tokenizer, each with the same stage-2 budget, and the
comparison report (tiny presets, 2 steps per run, a random-weight Inception saved to a file)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gear_hf import GEARPipeline
from gear_hf.evaluation.compare import ARMS, main, sample_fid, steps_to_reach
from gear_hf.evaluation.frechet import FIDStatistics
from gear_hf.evaluation.inception import FIDInceptionV3
from gear_hf.evaluation.sampler import sample_for_evaluation

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import NAMES, tiny_ar, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_steps_to_reach():
    curve = [(10, 5.0), (20, 4.0), (30, 3.5), (40, 3.6)]
    assert steps_to_reach(curve, 4.0) == 20 and steps_to_reach(curve, 3.5) == 30
    assert steps_to_reach(curve, 3.0) is None and steps_to_reach([], 1.0) is None


def test_arms_cover_the_paper_ablations():
    assert set(ARMS) == {"llamagen_repa", "gear", "gear_no_tokenizer_align", "straight_through",
                         "straight_through_ntp"}
    assert ARMS["llamagen_repa"] is None and ARMS["gear"] == []


class RecordingExtractor:
    """Keeps the images it is given; its "pool features" are a few of their pixels."""

    def __init__(self):
        self.images = []

    def adm_features(self, images):
        self.images.append(np.asarray(images))
        return {"pool": np.asarray(images).reshape(len(images), -1)[:, :3].astype(np.float64)}


def test_sample_fid_scores_the_images_of_evaluate_py_sample(tmp_path):
    torch.manual_seed(0)
    pipe = GEARPipeline(vq_model=tiny_tokenizer(), transformer=tiny_ar(), id2label=NAMES)
    expected = np.load(sample_for_evaluation(pipe, tmp_path, num_images=5, batch_size=4, seed=3))["arr_0"]
    extractor = RecordingExtractor()
    reference = FIDStatistics.from_features(np.random.default_rng(0).normal(size=(8, 3)))
    assert sample_fid(pipe, 5, reference, extractor, seed=3, batch_size=2) > 0
    np.testing.assert_array_equal(np.concatenate(extractor.images), expected)


def test_reproduce_end_to_end(tmp_path):
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pt")
    out = tmp_path / "reproduce"
    code = main(["--output-dir", str(out), "--configs", str(REPO / "configs" / "tiny"),
                 "--arms", "llamagen_repa", "gear", "straight_through_ntp",
                 "--stage0-steps", "2", "--stage1-steps", "2", "--stage2-steps", "3", "--num-images", "6",
                 "--inception", str(tmp_path / "inception.pt"),
                 "--set", "data.max_samples=8", "--set", "train.train_batch_size=4", "--set", "train.log_every=1",
                 "--set", "train.sample_every=0", "--set", "train.checkpointing_steps=0"])
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())["arms"]
    assert set(report) == {"llamagen_repa", "gear", "straight_through_ntp"}
    for arm, row in report.items():
        assert [s for s, _ in row["stage2_ntp_curve"]] == [1, 2, 3], arm
        assert {"rfid", "psnr", "ssim", "l1"} <= set(row["tokenizer"]) and row["fid"] > 0
        assert row["baseline_final_ntp"] == report["llamagen_repa"]["stage2_ntp_curve"][-1][1]
    assert report["llamagen_repa"]["steps_to_baseline_ntp"] == 3  # the baseline reaches its own final NTP
    assert report["llamagen_repa"]["stage1_codebook_usage"] == []  # no stage 1: the warm-up tokenizer as it is
    assert report["gear"]["stage1_codebook_usage"]  # logged over stage 1
    assert (out / "comparison.png").is_file()
    assert (out / "warmup" / "export.json").is_file() and (out / "gear" / "stage1" / "export.json").is_file()
