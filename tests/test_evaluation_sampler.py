"""The evaluation sampler: the same images whatever the number of processes (2 real CPU processes) and the batch
size, resumable after a kill, settings recorded, stale settings refused, and the text-to-image prompt branch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gear_hf import GEARPipeline
from gear_hf.evaluation.sampler import class_labels_for, sample_for_evaluation

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import NAMES, tiny_ar, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(1234)
    pipe = GEARPipeline(vq_model=tiny_tokenizer(), transformer=tiny_ar(), id2label=NAMES)
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_run(pipeline_dir, tmp_path_factory):
    """One process, batch 4, shards of 3: the set every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    pipe = GEARPipeline.from_pretrained(pipeline_dir)
    path = sample_for_evaluation(pipe, out, num_images=10, batch_size=4, shard_size=3, seed=7,
                                 guidance_scale=1.5)
    return np.load(path)


def test_output_format_labels_and_record(reference_run, tmp_path, pipeline_dir):
    images, labels = reference_run["arr_0"], reference_run["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3)
    assert np.array_equal(labels, class_labels_for(10, 10, seed=7))
    pipe = GEARPipeline.from_pretrained(pipeline_dir)
    path = sample_for_evaluation(pipe, tmp_path, num_images=10, batch_size=3, shard_size=5, seed=7,
                                 guidance_scale=1.5, label_mode="balanced", image_size_eval=8, save_png=True)
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["sampling_config"]["guidance_scale"] == 1.5 and record["label_mode"] == "balanced"
    assert record["class_label_counts"] == [1] * 10 and record["image_shape"] == [8, 8, 3]
    data = np.load(path)
    assert data["arr_0"].shape == (10, 8, 8, 3)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000009.png")), data["arr_0"][9])


def test_batch_size_and_shard_size_do_not_change_the_images(reference_run, pipeline_dir, tmp_path):
    pipe = GEARPipeline.from_pretrained(pipeline_dir)
    path = sample_for_evaluation(pipe, tmp_path, num_images=10, batch_size=3, shard_size=4, seed=7,
                                 guidance_scale=1.5)
    assert np.array_equal(np.load(path)["arr_0"], reference_run["arr_0"])


@pytest.mark.slow
def test_two_processes_give_the_same_set(reference_run, pipeline_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "scripts" / "evaluate.py"), "sample", "--pipeline", str(pipeline_dir), "--num-images", "10",
               "--sample-dir", str(tmp_path), "--sample-batch-size", "4", "--shard-size", "3", "--seed", "7",
               "--guidance-scale", "1.5", "--cpu", "--output", str(tmp_path / "result.json")]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "samples.json").read_text())["num_processes"] == 2
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], reference_run["arr_0"])
    assert json.loads((tmp_path / "result.json").read_text())["num_images"] == 10


@pytest.mark.slow
def test_resume_after_kill_keeps_finished_shards(reference_run, pipeline_dir, tmp_path):
    # A process that SIGKILLs itself in the middle of shard 1 (shards of 3, batches of 2: decode call 4).
    driver = tmp_path / "killed_run.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from gear_hf import GEARPipeline
        from gear_hf.evaluation.sampler import sample_for_evaluation
        pipe = GEARPipeline.from_pretrained({str(pipeline_dir)!r})
        decode, calls = pipe.vq_model.decode, []
        def killing_decode(tokens):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return decode(tokens)
        pipe.vq_model.decode = killing_decode
        sample_for_evaluation(pipe, {str(tmp_path / "run")!r}, num_images=10, batch_size=2, shard_size=3, seed=7,
                              guidance_scale=1.5)
    """))
    run = subprocess.run([sys.executable, str(driver)], env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    shards = tmp_path / "run" / "shards"
    assert sorted(p.name for p in shards.glob("shard_*.npz")) == ["shard_000000.npz"]
    kept = (shards / "shard_000000.npz").stat().st_mtime_ns
    (shards / "shard_000001.tmp.npz").write_bytes(b"partial")  # a write interrupted by a kill
    (shards / "shard_000002.npz").write_bytes(b"corrupt")
    pipe = GEARPipeline.from_pretrained(pipeline_dir)
    decode, calls = pipe.vq_model.decode, []
    pipe.vq_model.decode = lambda tokens: (calls.append(1), decode(tokens))[1]
    path = sample_for_evaluation(pipe, tmp_path / "run", num_images=10, batch_size=2, shard_size=3, seed=7,
                                 guidance_scale=1.5)
    assert np.array_equal(np.load(path)["arr_0"], reference_run["arr_0"])
    assert (shards / "shard_000000.npz").stat().st_mtime_ns == kept
    assert len(calls) == 5  # shards 1, 2 (two batches each) and 3 (one image): shard 0 was not redone
    with pytest.raises(ValueError, match="other settings.*seed"):
        sample_for_evaluation(pipe, tmp_path / "run", num_images=10, batch_size=2, shard_size=3, seed=8,
                              guidance_scale=1.5)


class TextToImageStandIn:
    """Duck-typed `pipe(prompt=[...], guidance_scale=..., generator=[...], output_type=...)` with a real tiny
    tokenizer as `vq_model`; tokens depend on the prompt and the image's generator only."""

    def __init__(self):
        self.vq_model = tiny_tokenizer()
        self.calls = []

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt=None, guidance_scale=1.0, generator=None, output_type="pil"):
        assert output_type == "latent" and len(generator) == len(prompt)
        self.calls.append(list(prompt))
        grid = self.vq_model.config.grid_size
        tokens = torch.stack([(torch.randint(0, 64, (grid, grid), generator=g) + len(p)) % 64
                              for p, g in zip(prompt, generator)])
        config = SimpleNamespace(to_dict=lambda: {"guidance_scale": guidance_scale})
        return SimpleNamespace(images=tokens, sampling_config=config)


def test_prompt_branch_one_image_per_prompt(tmp_path):
    torch.manual_seed(0)
    pipe = TextToImageStandIn()
    prompts = ["a red bus", "two cats on a sofa", "a bowl of fruit"]
    path = sample_for_evaluation(pipe, tmp_path / "a", prompts=prompts, batch_size=2, shard_size=2,
                                 guidance_scale=1.75)
    data = np.load(path)
    assert data["arr_0"].shape == (3, 16, 16, 3) and "arr_1" not in data
    assert [p for call in pipe.calls for p in call] == prompts
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["sampling_config"] == {"guidance_scale": 1.75} and record["num_images"] == 3
    again = sample_for_evaluation(pipe, tmp_path / "b", prompts=prompts, batch_size=3, shard_size=3,
                                  guidance_scale=1.75)
    assert np.array_equal(np.load(again)["arr_0"], data["arr_0"])
    with pytest.raises(ValueError, match="non-empty strings"):
        sample_for_evaluation(pipe, tmp_path / "c", prompts=["ok", ""])
