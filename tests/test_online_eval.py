"""In-training FID (`eval.every`): the hook samples the EMA models, extracts Inception features on every rank,
and the FID of the gathered features does not depend on the number of processes (tiny models, a random-weight
Inception saved to a file, a reference batch of real images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_loop import COMMON

from gear_hf.evaluation.inception import FIDInceptionV3
from gear_hf.training.config import TrainingConfig
from gear_hf.training.data import fashion_mnist_dataset
from gear_hf.training.trainer import GEARTrainer, TrainingSetupError

REPO = Path(__file__).resolve().parents[1]
STAGE2 = REPO / "configs" / "tiny" / "stage2.yaml"
FRESH = ["train.init_from=null", "train.init_ar_from_previous=false",
         "tokenizer.config={quantizer: vq, codebook_size: 64, image_size: 32, base_channels: 32, "
         "channel_multipliers: [1, 1, 2], num_res_blocks: 1, z_channels: 32, codebook_embed_dim: 8, "
         "attention_levels: []}"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_eval")
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), root / "inception.pt")
    ds = fashion_mnist_dataset()
    images = np.stack([np.asarray(ds[i]["image"].convert("RGB").resize((32, 32))) for i in range(0, 4000, 500)])
    np.savez(root / "reference.npz", arr_0=images)
    return root


def overrides(out, files, *extra):
    return [f"train.output_dir={out}", *COMMON, *FRESH, "train.max_train_steps=1", "eval.every=1",
            "eval.num_samples=5", "eval.batch_size=2", f"eval.reference={files / 'reference.npz'}",
            f"eval.inception={files / 'inception.pt'}", *extra]


def test_online_fid_is_logged_and_matches_a_direct_computation(tmp_path, eval_files):
    from gear_hf.evaluation import InceptionExtractor, fid_of_samples, load_reference_statistics
    from gear_hf.evaluation.sampler import class_labels_for, image_seed
    from gear_hf.pipelines import to_uint8

    tr = GEARTrainer(TrainingConfig.from_yaml(STAGE2, overrides(tmp_path, eval_files)))
    tr.train()
    fid = tr.last_eval["eval/fid"]
    assert np.isfinite(fid) and fid > 0 and tr.last_eval["eval/num_samples"] == 5

    ar, tokenizer = tr.components.ar_ema.model, tr.components.tokenizer
    labels = class_labels_for(5, ar.config.num_classes, 0)
    tokens = ar.generate_images(torch.as_tensor(labels), guidance_scale=1.0, top_k=0,
                                generator=[torch.Generator().manual_seed(image_seed(0, i)) for i in range(5)])
    with torch.no_grad():
        images = to_uint8(tokenizer.decode(tokens).clamp(-1, 1)).numpy()
    extractor = InceptionExtractor(inception_path=eval_files / "inception.pt", progress=False)
    reference = load_reference_statistics(eval_files / "reference.npz", extractor)
    with pytest.warns(UserWarning, match="biased high"):
        direct = fid_of_samples(images, reference, extractor, method="eigh")
    assert abs(direct - fid) <= 1e-6 * max(1.0, abs(direct))


def test_setup_errors(tmp_path, eval_files):
    with pytest.raises(TrainingSetupError, match="eval.reference: .* is not a file"):
        GEARTrainer(TrainingConfig.from_yaml(STAGE2, overrides(tmp_path / "a", eval_files,
                                                               "eval.reference=/nowhere.npz"))).build()
    with pytest.raises(TrainingSetupError, match="eval.inception: Inception weights file"):
        GEARTrainer(TrainingConfig.from_yaml(STAGE2, overrides(tmp_path / "b", eval_files,
                                                               "eval.inception=/nowhere.pt"))).build()


_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from gear_hf.training.config import TrainingConfig
    from gear_hf.training.trainer import GEARTrainer
    tr = GEARTrainer(TrainingConfig.from_yaml(sys.argv[1], sys.argv[3:]))
    tr.train()
    if tr.accelerator.is_main_process:
        open(sys.argv[2], "w").write(json.dumps(tr.last_eval))
    """
)


@pytest.mark.slow
def test_prompt_file_errors(tmp_path):
    from gear_hf.training.online_eval import read_prompts

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(TrainingSetupError, match="eval.prompts: .*empty.txt holds no prompt"):
        read_prompts(str(empty))
    no_caption = tmp_path / "prompts.jsonl"
    no_caption.write_text(json.dumps({"key": 0}) + "\n", encoding="utf-8")
    with pytest.raises(TrainingSetupError, match="eval.prompts: .*prompts.jsonl:1 has no 'caption'"):
        read_prompts(str(no_caption))
    with pytest.raises(TrainingSetupError, match="eval.prompts: .* is not a file"):
        read_prompts(None)


def test_two_processes_share_the_sampling_and_give_the_same_fid(tmp_path, eval_files):
    """Each rank samples its images (i = rank, rank + 2, ...); the gathered FID equals one process's, when the two
    runs have the same EMA models (lr 0: the EMA stays the initial copy, which both runs build identically)."""
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    common = overrides(tmp_path / "out", eval_files, "optim.ar_lr=0.0")
    single = subprocess.run([sys.executable, str(script), str(STAGE2), str(tmp_path / "one.json"),
                             *[o.replace(str(tmp_path / "out"), str(tmp_path / "one")) for o in common]],
                            env=env, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(STAGE2), str(tmp_path / "two.json"),
                          *[o.replace(str(tmp_path / "out"), str(tmp_path / "two")) for o in common]],
                         env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    one_fid = json.loads((tmp_path / "one.json").read_text())["eval/fid"]
    two_fid = json.loads((tmp_path / "two.json").read_text())["eval/fid"]
    assert abs(one_fid - two_fid) <= 1e-5 * max(1.0, abs(one_fid))
