"""The accelerate training loop: exact resume, atomic checkpoints, 2-process DDP on CPU, config errors.

Everything runs on the tiny CPU preset (`configs/tiny/`) in fp32 with one intra-op thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gear_hf.training import checkpointing as ckpt
from gear_hf.training import trainer as trainer_module
from gear_hf.training.config import TrainingConfig
from gear_hf.training.trainer import GEARTrainer, TrainingSetupError

REPO = Path(__file__).resolve().parents[1]
TINY = {stage: REPO / "configs" / "tiny" / f"stage{stage}.yaml" for stage in (0, 1, 2)}
PYTHON = sys.executable

# 8 images, global batch 4 → 2 batches per epoch: a resume at step 3 is mid-epoch in epoch 1.
COMMON = [
    "data.max_samples=8",
    "train.train_batch_size=4",
    "train.log_every=2",
    "train.stats_every=2",
    "train.sample_every=0",
    "train.checkpointing_steps=0",
    "train.report_to=none",
    "train.export_pipeline=false",
]
N = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(out: Path, *overrides: str, stage: int = 1) -> TrainingConfig:
    return TrainingConfig.from_yaml(TINY[stage], [f"train.output_dir={out}", *COMMON, *overrides])


def _named_tensors(obj, prefix=""):
    """Flatten nested dicts/lists of tensors (state dicts, optimizer states) into {path: tensor}."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_named_tensors(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(_named_tensors(value, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def snapshot(tr: GEARTrainer) -> dict:
    from gear_hf.training.gear_step import unwrap

    state = {}
    for name in ("tokenizer", "ar", "projector", "discriminator"):
        module = getattr(tr.components, name)
        if module is not None:
            state[name] = {k: v.clone() for k, v in unwrap(module).state_dict().items()}
    for name in ("opt_tok", "opt_ar", "opt_disc", "sched_tok", "sched_ar", "sched_disc"):
        obj = getattr(tr.components, name)
        if obj is not None:
            state[name] = _named_tensors(obj.state_dict())
    for name in ("tokenizer_ema", "ar_ema"):
        ema = getattr(tr.components, name)
        if ema is not None:
            state[name] = _named_tensors(ema.state_dict())
    state["step"] = tr.global_step
    state["data"] = (tr.epoch, tr.batches_in_epoch)
    return state


def assert_identical(a: dict, b: dict, path=""):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}/{key}")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """N stage-1 steps in one go (module-scoped: reused by several tests)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    tr = GEARTrainer(tiny_config(out, f"train.max_train_steps={N}"))
    result = tr.train()
    assert result["status"] == "finished" and result["global_step"] == N
    return out, snapshot(tr), tr.last_logs


def test_multi_process_stop_check_runs_on_a_shared_schedule():
    """Several processes: the SIGTERM flag is reduced (a host sync) only every STOP_CHECK_EVERY steps, and every rank
    then stops at that step; one process reads its flag at every step without any collective."""
    from types import SimpleNamespace

    calls = []
    every = trainer_module.STOP_CHECK_EVERY
    accelerator = SimpleNamespace(num_processes=2, set_trigger=lambda: calls.append("set"),
                                  check_trigger=lambda: calls.append("check") or "set" in calls)
    trainer = SimpleNamespace(accelerator=accelerator, global_step=0)
    stop = SimpleNamespace(requested=False)
    stops = []
    for step in range(1, 3 * every + 1):
        trainer.global_step = step
        stop.requested = step >= every + 3  # the signal arrives mid-interval
        if GEARTrainer._stop_now(trainer, stop):
            stops.append(step)
    assert stops == [2 * every, 3 * every] and calls.count("check") == 3
    single = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), global_step=3)
    assert GEARTrainer._stop_now(single, SimpleNamespace(requested=True)) is True


def test_exact_resume_after_sigterm(straight_run, tmp_path, monkeypatch):
    """N/2 steps, SIGTERM → checkpoint + clean exit, resume, N/2 more == N straight (bit-identical, fp32 CPU):
    parameters, both EMAs, all optimizer/scheduler states and the data position. The resume lands mid-epoch in
    epoch 1 (accelerate#2016/#2823/#4071-class bugs)."""
    _, expected, expected_logs = straight_run
    step_fn = trainer_module.STEP_FUNCTIONS[1]
    calls = {"n": 0}

    def step_then_sigterm(*args, **kwargs):
        logs = step_fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == N // 2:
            signal.raise_signal(signal.SIGTERM)  # handled by the trainer: save at this step boundary
        return logs

    monkeypatch.setitem(trainer_module.STEP_FUNCTIONS, 1, step_then_sigterm)
    first = GEARTrainer(tiny_config(tmp_path, f"train.max_train_steps={N}"))
    result = first.train()
    assert result == {"global_step": N // 2, "status": "interrupted", "output_dir": str(tmp_path)}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    saved = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert saved.name == ckpt.checkpoint_name(N // 2)
    state = ckpt.read_state(saved)
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 1)
    assert not (tmp_path / "tokenizer").exists()  # an interrupted run exports nothing
    monkeypatch.setitem(trainer_module.STEP_FUNCTIONS, 1, step_fn)

    second = GEARTrainer(tiny_config(tmp_path, f"train.max_train_steps={N}"))
    assert second.train(resume_from_checkpoint="latest")["status"] == "finished"
    assert_identical(snapshot(second), expected)
    assert second.last_logs["ar/ntp_loss"] == expected_logs["ar/ntp_loss"]
    # from_pretrained exports of the EMAs.
    from gear_hf.models.modeling_gear_ar import GEARForCausalImageLM

    ar = GEARForCausalImageLM.from_pretrained(tmp_path / "ar")
    for key, value in ar.state_dict().items():
        assert torch.equal(value, expected["ar_ema"][f"/model/{key}"]), key


@pytest.mark.parametrize(
    "stage, overrides",
    [
        (0, []),  # tokenizer warm-up: tokenizer + EMA (with buffers) + discriminator
        (1, ["train.gradient_accumulation_steps=2"]),  # accumulation: resume at a sync boundary
        (2, ["train.init_from=null", "tokenizer.config.z_channels=32", "tokenizer.config.quantizer=vq",
             "tokenizer.config.codebook_size=64",
             "tokenizer.config.image_size=32", "tokenizer.config.base_channels=32",
             "tokenizer.config.channel_multipliers=[1,1,2]", "tokenizer.config.num_res_blocks=1",
             "tokenizer.config.attention_levels=[]"]),  # frozen (fresh) tokenizer + AR
    ],
)
def test_exact_resume_other_stages(tmp_path, stage, overrides):
    steps = 4
    straight = GEARTrainer(tiny_config(tmp_path / "a", f"train.max_train_steps={steps}", *overrides, stage=stage))
    straight.train()
    first = GEARTrainer(tiny_config(tmp_path / "b", f"train.max_train_steps={steps // 2}", *overrides, stage=stage))
    first.train()
    resumed = GEARTrainer(tiny_config(tmp_path / "b", f"train.max_train_steps={steps}", *overrides, stage=stage))
    resumed.train(resume_from_checkpoint="latest")
    assert_identical(snapshot(resumed), snapshot(straight))


def test_nonfinite_and_zero_grad_alarms(tmp_path, monkeypatch, capsys):
    step_fn = trainer_module.STEP_FUNCTIONS[1]

    def poisoned(*args, **kwargs):
        logs = step_fn(*args, **kwargs)
        logs["grad_norm/ar"] = torch.zeros(())  # as if the AR received no gradient
        logs["tokenizer/l1"] = torch.tensor(float("nan"))
        return logs

    monkeypatch.setitem(trainer_module.STEP_FUNCTIONS, 1, poisoned)
    tr = GEARTrainer(tiny_config(tmp_path, "train.max_train_steps=2", "train.log_every=2",
                                 "train.zero_grad_alarm_steps=2"))
    tr.train()
    out = capsys.readouterr().out
    assert "ALARM: Non-finite values at step 2: tokenizer/l1" in out
    assert "ALARM: grad_norm/ar has been exactly 0 for 2 consecutive steps" in out
    tr = GEARTrainer(tiny_config(tmp_path / "abort", "train.max_train_steps=2", "train.log_every=1",
                                 "train.abort_on_nonfinite=true"))
    with pytest.raises(FloatingPointError, match="tokenizer/l1"):
        tr.train()


def test_atomic_checkpoints_ignore_interrupted_saves(straight_run, tmp_path):
    out, expected, _ = straight_run
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == ckpt.checkpoint_name(N)
    # A save killed before the rename leaves a temp dir; a dir without the state file is incomplete too.
    (root / f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(N + 1)}").mkdir()
    (root / f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(N + 1)}" / "model.safetensors").write_bytes(b"garbage")
    (root / ckpt.checkpoint_name(N + 2)).mkdir()
    assert ckpt.latest_checkpoint(root) == latest
    assert ckpt.resolve_resume_path("latest", tmp_path) == latest
    assert ckpt.resolve_resume_path(str(tmp_path), tmp_path / "elsewhere") == latest

    # Resuming from it and saving again cleans the leftovers, keeps `checkpoints_total_limit`.
    tr = GEARTrainer(tiny_config(tmp_path, f"train.max_train_steps={N + 1}", "train.checkpoints_total_limit=1"))
    tr.train(resume_from_checkpoint="latest")
    names = sorted(p.name for p in root.iterdir())
    assert names == [ckpt.checkpoint_name(N + 1), ckpt.checkpoint_name(N + 2)]  # incomplete dir is not ours to delete
    assert ckpt.latest_checkpoint(root).name == ckpt.checkpoint_name(N + 1)
    assert json.loads((root / ckpt.checkpoint_name(N + 1) / ckpt.STATE_FILE).read_text())["global_step"] == N + 1


def test_resume_with_other_config_is_one_clear_error(straight_run, tmp_path):
    out, _, _ = straight_run
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    tr = GEARTrainer(tiny_config(tmp_path, f"train.max_train_steps={N + 1}", "ar.config.hidden_size=32",
                                 "ar.config.intermediate_size=64"))
    with pytest.raises(ckpt.CheckpointCompatibilityError, match=r"ar\.hidden_size: checkpoint=64, current=32"):
        tr.train(resume_from_checkpoint="latest")
    tr = GEARTrainer(tiny_config(tmp_path, f"train.max_train_steps={N + 1}", "tokenizer.config.quantizer=lfq",
                                 "tokenizer.config.codebook_embed_dim=null", "tokenizer.config.z_channels=null"))
    with pytest.raises(ckpt.CheckpointCompatibilityError, match="tokenizer.quantizer"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoints"))
    with pytest.raises(TrainingSetupError, match="not a complete checkpoint"):
        GEARTrainer(tiny_config(tmp_path)).train(resume_from_checkpoint=str(tmp_path / "nowhere"))


def test_older_signatures_resume_class_conditional_runs():
    """Checkpoints written before `ar.condition_type`, the text keys and an always-recorded `train.fsdp`: the
    missing keys read as their defaults, so a class-conditional run resumes them; a text-conditional run does not."""
    from gear_hf.models.configuration_gear_ar import GEARConfig

    cfg = TrainingConfig()
    current = ckpt.structural_signature(cfg, ar_config=GEARConfig())
    assert current["train.fsdp"] is False and current["ar.condition_type"] == "class"
    assert not {"ar.caption_dim", "ar.text_length", "ar.text_attention", "ar.num_double_stream_layers"} & set(current)
    oldest = {k: v for k, v in current.items() if k not in ("ar.condition_type", "train.fsdp")}
    ckpt.check_compatible(oldest, current, "old")
    with_text_keys = {**current, "ar.caption_dim": 2048, "ar.text_length": 300, "ar.text_attention": "causal",
                      "ar.num_double_stream_layers": 0}  # once recorded for class-conditional ARs as well
    del with_text_keys["train.fsdp"]
    ckpt.check_compatible(with_text_keys, current, "old")
    text = ckpt.structural_signature(cfg, ar_config=GEARConfig(condition_type="text"))
    with pytest.raises(ckpt.CheckpointCompatibilityError, match=r"ar\.condition_type: checkpoint='class'"):
        ckpt.check_compatible(oldest, text, "old")


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["train.not_a_key=1"], ValueError, r"Unknown config key 'train.not_a_key'"),
        (["gear.tempreature=0.1"], ValueError, r"Did you mean 'gear.temperature'"),
        (["gear.temperature=0"], ValueError, r"τ\) must be > 0"),
        (["gear.temperature=-0.5"], ValueError, r"τ\) must be > 0"),
        (["train.stage=3"], ValueError, r"train.stage' must be one of"),
    ],
)
def test_config_errors(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(tmp_path, *overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["gear.align_layer=3"], r"gear.align_layer \(ℓ\) = 3 must be in \[1, 2\]"),
        (["data.image_size=30"], r"data.image_size=30 is not divisible by the tokenizer's downsample factor 4"),
        (["train.train_batch_size=3", "train.gradient_accumulation_steps=2"], r"GLOBAL batch"),
        (["data.source=imagefolder", "data.path={empty}"], r"No images found"),
        (["ar.config.vocab_size=10"], r"ar.vocab_size=10 does not match the tokenizer"),
    ],
)
def test_setup_errors(tmp_path, overrides, match):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tmp_path / "out", *[o.format(empty=empty) for o in overrides])
    with pytest.raises(TrainingSetupError, match=match):
        GEARTrainer(cfg).build()


@pytest.mark.parametrize(
    "overrides, env, match",
    [
        (["train.fsdp=true", "train.deepspeed_config=configs/accelerate/deepspeed_zero2.json"], {},
         r"Both FSDP .* and DeepSpeed .* pick one engine"),
        ([], {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_DEEPSPEED": "true",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/accelerate/deepspeed_zero2.json"}, r"pick one engine"),
        (["train.fsdp=true"], {"FSDP_VERSION": "1"}, r"supports FSDP2 only: set fsdp_version: 2"),
        (["gear.straight_through_ntp=true"],
         {"ACCELERATE_USE_DEEPSPEED": "true",
          "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/accelerate/deepspeed_zero2.json"},
         r"straight_through_ntp .* not supported with the deepspeed engine.*use DDP"),
        (["train.fsdp=true"], {}, r"FSDP shards over processes: launch it with several"),
        (["train.fsdp=true", "train.gradient_accumulation_steps=2", "train.train_batch_size=8"], {},
         r"fsdp engine supports train.gradient_accumulation_steps=1 only"),
        (["train.mixed_precision=fp16"], {}, r"fp16 needs a CUDA GPU"),
        (["train.deepspeed_config={bf16_json}"], {}, r"enables DeepSpeed's bf16 mode.*train.mixed_precision"),
        (["train.compile=true"], {"CXX": "no-such-compiler", "PATH": ""}, r"needs a C\+\+ compiler"),
    ],
)
def test_engine_precision_compile_errors_before_any_model(tmp_path, monkeypatch, overrides, env, match):
    """A choice that cannot work on this machine is one error at start-up, before any model is built."""
    bf16_json = tmp_path / "bf16.json"
    bf16_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the configuration error")

    monkeypatch.setattr(trainer_module, "build_models", no_models)
    cfg = tiny_config(tmp_path / "out", *[o.format(bf16_json=bf16_json) for o in overrides])
    with pytest.raises(TrainingSetupError, match=match):
        GEARTrainer(cfg).build()


def test_teacher_grid_mismatch_says_resize(tmp_path, monkeypatch):
    from gear_hf.training.alignment import DINOv2Teacher

    original = DINOv2Teacher.preprocess

    def wrong_size(self, images):  # a teacher whose patch grid is half the token grid
        x = original(self, images)
        return torch.nn.functional.interpolate(x, scale_factor=0.5)

    monkeypatch.setattr(DINOv2Teacher, "preprocess", wrong_size)
    with pytest.raises(TrainingSetupError, match=r"(?s)grid mismatch.*Resize"):
        GEARTrainer(tiny_config(tmp_path)).build()


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from gear_hf.training.config import TrainingConfig
    from gear_hf.training.trainer import GEARTrainer
    from gear_hf.training.gear_step import unwrap
    from torch.distributed.tensor import DTensor
    from gear_hf.models import modeling_gear_ar
    cfg = TrainingConfig.from_yaml(sys.argv[1], sys.argv[3:])
    tr = GEARTrainer(cfg).build()
    # Dtypes seen while training: weights read in the forward (ZeRO-3 / FSDP2: gathered), fp32 islands, bf16 matmuls.
    c, probes = tr.components, {}
    def record(name, value):
        probes.setdefault(name, set()).add(str(value))
    tok, ar = unwrap(c.tokenizer), unwrap(c.ar)
    tok.quantize.register_forward_pre_hook(lambda m, a: record("codebook", m.embedding.weight.dtype))
    tok.quantize.register_forward_hook(lambda m, a, o: record("assignment_logits", o.assignment_logits.dtype)
                                       if o.assignment_logits is not None else None)
    ar.layers[0].attention_norm.register_forward_pre_hook(lambda m, a: record("rmsnorm_weight", m.weight.dtype))
    ar.layers[0].attention.wqkv.register_forward_hook(lambda m, a, o: record("linear_out", o.dtype))
    soft_embed = modeling_gear_ar.soft_embed  # the soft pass's softmax(A/τ)·E
    def recorded_soft_embed(*args):
        embedded = soft_embed(*args)
        record("soft_readout", embedded.dtype)
        return embedded
    modeling_gear_ar.soft_embed = recorded_soft_embed
    result = tr.train()
    acc = tr.accelerator
    live = {name: dict(unwrap(getattr(tr.components, name)).named_parameters())
            for name in ("tokenizer", "ar", "projector", "discriminator")}
    # ZeRO-3 leaves each rank its own shard (empty local tensors), FSDP2 its DTensor shards: live weights are
    # checked through the exports.
    partitioned = sum(p.numel() == 0 or isinstance(p, DTensor) for params in live.values() for p in params.values())
    state = {} if partitioned else {name: {k: v.detach().clone() for k, v in params.items()}
                                    for name, params in live.items()}
    state["tokenizer_ema"] = {k: v.clone() for k, v in tr.components.tokenizer_ema.model.state_dict().items()}
    state["ar_ema"] = {k: v.clone() for k, v in tr.components.ar_ema.model.state_dict().items()}
    state["meta"] = [acc.num_processes, str(acc.distributed_type), result["global_step"], tr.per_device_batch_size,
                     partitioned, sum(len(params) for params in live.values())]
    state["probes"] = {name: sorted(values) for name, values in probes.items()}
    state["probes"]["ema"] = sorted({str(v.dtype) for name in ("tokenizer_ema", "ar_ema") for v in state[name].values()
                                     if v.is_floating_point()})
    torch.save(state, f"{sys.argv[2]}/rank{acc.process_index}.pt")
    """
)

# fp32, no gradient clipping (DeepSpeed's clipping and accelerate's differ in where the norm is taken), same seed
# and data: the DDP and DeepSpeed runs must then agree.
COMPARABLE = ["optim.max_grad_norm=0"]


def _run_two_processes(tmp_path, *extra, steps=3):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "out"
    overrides = [f"train.output_dir={out}", *COMMON, f"train.max_train_steps={steps}", "train.log_every=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(TINY[1]), str(tmp_path), *overrides]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    meta = rank0.pop("meta")
    rank1.pop("meta")
    meta.append(rank0.pop("probes"))
    rank1.pop("probes")
    return out, meta, rank0, rank1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """3 stage-1 steps, 2 processes (torchrun, gloo), DDP, fp32, no clipping: the reference for DeepSpeed."""
    return _run_two_processes(tmp_path_factory.mktemp("ddp"), *COMPARABLE)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    config = REPO / "configs" / "accelerate" / "deepspeed_zero2.json"
    return _run_two_processes(tmp_path_factory.mktemp("zero2"), f"train.deepspeed_config={config}", *COMPARABLE)


LIVE = ("tokenizer", "ar", "projector", "discriminator")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(ddp_run):
    """2 processes (torchrun, gloo): a few stage-1 steps leave bit-identical parameters and EMAs on both ranks."""
    out, meta, rank0, rank1 = ddp_run
    assert meta[:5] == [2, "DistributedType.MULTI_CPU", 3, 2, 0]
    assert_identical(rank0, rank1)
    assert (out / "checkpoints" / ckpt.checkpoint_name(3) / "random_states_1.pkl").is_file()


@pytest.mark.slow
def test_two_process_deepspeed_zero2_matches_ddp(zero2_run, ddp_run):
    """Experimental DeepSpeed path: ZeRO-2, one engine per trainable module (tokenizer; AR + projector;
    discriminator), 2 CPU processes (gloo). Both ranks agree, and tokenizer, AR, projector, discriminator and both
    EMAs equal the DDP run's bit for bit (measured max |diff| = 0.0: with 2 ranks the gradient average (a + b) / 2
    is exact in any reduction order, and AdamW is elementwise, flat ZeRO partitions or not)."""
    out, meta, rank0, rank1 = zero2_run
    assert meta[:5] == [2, "DistributedType.DEEPSPEED", 3, 2, 0]
    assert_identical(rank0, rank1)
    _, _, reference, _ = ddp_run
    assert set(LIVE) <= rank0.keys()
    assert_identical(rank0, reference)
    saved = out / "checkpoints" / ckpt.checkpoint_name(3)
    assert (saved / "pytorch_model").is_dir() and (saved / "ar" / "pytorch_model").is_dir()
    assert (saved / "discriminator" / "pytorch_model").is_dir()


def _exported_live_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    from gear_hf.models.modeling_gear_ar import GEARForCausalImageLM
    from gear_hf.models.modeling_gear_tokenizer import GEARTokenizerModel

    return {
        "tokenizer": dict(GEARTokenizerModel.from_pretrained(out / "raw" / "tokenizer").named_parameters()),
        "ar": dict(GEARForCausalImageLM.from_pretrained(out / "raw" / "ar").named_parameters()),
        "projector": load_file(str(out / "raw" / "projector.safetensors")),
        "discriminator": load_file(str(out / "raw" / "discriminator.safetensors")),
        "tokenizer_ema": dict(GEARTokenizerModel.from_pretrained(out / "tokenizer").state_dict()),
        "ar_ema": dict(GEARForCausalImageLM.from_pretrained(out / "ar").state_dict()),
    }


@pytest.mark.slow
def test_two_process_deepspeed_zero3_runs_and_exports(tmp_path, ddp_run):
    """ZeRO-3 (parameters really partitioned: persistence threshold 0), 2 CPU processes: stage 1 runs (soft branch
    through the partitioned, frozen AR; EMAs from gathered parameters), checkpoints per engine and exports full
    weights (gathered) that load with from_pretrained; the EMAs agree across ranks.

    The exports are close to the DDP run but not bit-identical: ZeRO-3's module hooks change the linear layers'
    weight gradients at the last bit (1-D parameters stay exact). After 3 steps the AR, projector and discriminator
    differ by <= 3e-8; the tokenizer, which gets the soft-branch gradient through that AR, by <= 2e-4 = 2 x lr,
    because Adam's early steps (update ~ lr * sign(g)) turn a last-bit change of a near-zero gradient into a sign
    flip."""
    pytest.importorskip("deepspeed")
    config = json.loads((REPO / "configs" / "accelerate" / "deepspeed_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny parameters
    config_path = tmp_path / "zero3.json"
    config_path.write_text(json.dumps(config))
    out, meta, rank0, rank1 = _run_two_processes(tmp_path, f"train.deepspeed_config={config_path}", *COMPARABLE)
    assert meta[:4] == [2, "DistributedType.DEEPSPEED", 3, 2]
    assert meta[4] == meta[5] > 0, "ZeRO-3 left parameters unpartitioned: the test would not exercise gathering"
    assert_identical(rank0, rank1)  # the EMAs (full copies)
    saved = out / "checkpoints" / ckpt.checkpoint_name(3)
    assert (saved / "pytorch_model").is_dir() and (saved / "ar" / "pytorch_model").is_dir()

    exported = _exported_live_weights(out)
    for name in ("tokenizer_ema", "ar_ema"):
        assert_identical(exported[name], rank0[name])
    _, _, reference, _ = ddp_run
    tolerance = {"tokenizer": 1e-3, "tokenizer_ema": 1e-5, "ar": 1e-6, "ar_ema": 1e-6, "projector": 1e-6,
                 "discriminator": 1e-6}
    for name, atol in tolerance.items():
        got, want = exported[name], reference[name]
        assert got.keys() >= want.keys(), name
        for key, value in want.items():
            assert got[key].shape == value.shape, f"{name}.{key}"
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=f"{name}.{key}")


# ----------------------------------------------------------------------------------- bf16 engines, FSDP2 (issue 10)
BF16 = ["train.mixed_precision=bf16"]
FSDP = ["train.fsdp=true"]
ZERO2 = f"train.deepspeed_config={REPO / 'configs' / 'accelerate' / 'deepspeed_zero2.json'}"
# What every bf16 engine must show while training: fp32 weights in the forward (codebook, norms), fp32 assignment
# logits and soft read-out, bf16 linear outputs (autocast really on), fp32 EMAs.
BF16_PROBES = {"codebook": ["torch.float32"], "assignment_logits": ["torch.float32"],
               "rmsnorm_weight": ["torch.float32"], "soft_readout": ["torch.float32"],
               "linear_out": ["torch.bfloat16"], "ema": ["torch.float32"]}


@pytest.fixture(scope="module")
def ddp_bf16_run(tmp_path_factory):
    """3 stage-1 steps, 2 processes, DDP, bf16 autocast: the reference for the other bf16 engines."""
    return _run_two_processes(tmp_path_factory.mktemp("ddp_bf16"), *COMPARABLE, *BF16)


@pytest.fixture(scope="module")
def fsdp_bf16_run(tmp_path_factory):
    """The same with FSDP2; it also checkpoints at step 2 (for the resume test)."""
    return _run_two_processes(tmp_path_factory.mktemp("fsdp_bf16"), *COMPARABLE, *BF16, *FSDP,
                              "train.checkpointing_steps=2")


def _live_and_ema(run):
    """Live weights and EMAs of a 2-process run: from the rank-0 dump, or (sharded engines) from its exports."""
    out, meta, rank0, _ = run
    return rank0 if set(LIVE) <= rank0.keys() else _exported_live_weights(out)


@pytest.mark.slow
def test_two_process_bf16_deepspeed_matches_ddp(tmp_path, ddp_bf16_run):
    """bf16 DeepSpeed: ZeRO-2 engines for tokenizer, AR + projector and discriminator with fp32 master weights
    (DeepSpeed `torch_autocast`, fp32 gradient reduction), the frozen-AR soft pass and the GAN term autocast by the
    trainer, fp32 EMAs. It equals bf16 DDP bit for bit (measured max |diff| 0.0: same autocast regions, fp32
    outputs of the prepared modules, discriminator in the losses' fp32 region, fp32 (a + b) / 2 reductions)."""
    pytest.importorskip("deepspeed")
    out, meta, rank0, rank1 = _run_two_processes(tmp_path, ZERO2, *COMPARABLE, *BF16)
    assert meta[:5] == [2, "DistributedType.DEEPSPEED", 3, 2, 0]
    assert meta[6] == BF16_PROBES
    assert ddp_bf16_run[1][6] == BF16_PROBES
    assert_identical(rank0, rank1)
    assert_identical(rank0, ddp_bf16_run[2])
    exported = _exported_live_weights(out)
    for name in ("tokenizer_ema", "ar_ema"):
        assert_identical(exported[name], rank0[name])


@pytest.mark.slow
def test_two_process_fsdp2_bf16_matches_ddp(fsdp_bf16_run, ddp_bf16_run):
    """FSDP2 on 2 CPU processes (gloo): tokenizer, AR + projector and discriminator each a sharded root with its
    own optimizer, the frozen-AR soft pass on sharded parameters, EMAs of the all-gathered shards, sharded (DCP)
    checkpoints per engine, full-state-dict exports. Against bf16 DDP after 3 steps: measured max |diff| 0.0
    except the AR (9.3e-10: FSDP2's reduce-scatter sums in another order); asserted to 1e-7."""
    out, meta, rank0, rank1 = fsdp_bf16_run
    assert meta[:4] == [2, "DistributedType.FSDP", 3, 2]
    assert meta[4] == meta[5] > 0, "FSDP2 left parameters unsharded"
    assert meta[6] == BF16_PROBES
    assert_identical(rank0, rank1)  # the EMAs: whole copies on every rank
    saved = out / "checkpoints" / ckpt.checkpoint_name(3)
    for engine in ("", "ar", "discriminator"):
        assert (saved / engine / "pytorch_model_fsdp_0" / ".metadata").is_file(), engine
    exported, reference = _exported_live_weights(out), _live_and_ema(ddp_bf16_run)
    for name in ("tokenizer_ema", "ar_ema"):
        assert_identical(exported[name], rank0[name])
    for name in (*LIVE, "tokenizer_ema", "ar_ema"):
        assert exported[name].keys() >= reference[name].keys(), name
        for key, value in reference[name].items():
            torch.testing.assert_close(exported[name][key], value, rtol=0, atol=1e-7, msg=f"{name}.{key}")


@pytest.mark.slow
def test_two_process_fsdp2_resumes_exactly(tmp_path, fsdp_bf16_run):
    """FSDP2: resuming the sharded `save_state` checkpoint of step 2 and training step 3 == the 3 straight steps, bit
    for bit: every live weight, buffer (BatchNorm statistics: rank 0's on every rank, see
    `broadcast_buffers_like_ddp`) and EMA."""
    straight_out = fsdp_bf16_run[0]
    step2 = straight_out / "checkpoints" / ckpt.checkpoint_name(2)
    out, meta, _, _ = _run_two_processes(tmp_path, *COMPARABLE, *BF16, *FSDP, f"train.resume_from_checkpoint={step2}")
    assert meta[2] == 3
    resumed, straight = _exported_live_weights(out), _exported_live_weights(straight_out)
    for name in straight:
        assert_identical(resumed[name], straight[name], name)


def _run_capturing_step_logs(cfg, monkeypatch):
    step_fn, logs = trainer_module.STEP_FUNCTIONS[1], []

    def capture(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        logs.append({k: float(v) for k, v in out.items() if v is not None})
        return out

    monkeypatch.setitem(trainer_module.STEP_FUNCTIONS, 1, capture)
    tr = GEARTrainer(cfg)
    tr.train()
    monkeypatch.setitem(trainer_module.STEP_FUNCTIONS, 1, step_fn)
    return tr, logs


@pytest.mark.slow
def test_compiled_training_agrees_with_eager(tmp_path, monkeypatch):
    """`train.compile=true` (tokenizer, AR and discriminator compiled in place): 3 stage-1 steps against eager on
    the same data, with inductor drawing dropout from eager's RNG (`fallback_random`; by default compiled dropout
    uses its own random stream). No graph break anywhere in the step (soft pass with `stop_at_layer`, hard pass,
    GAN term, discriminator loss). Measured: first-step losses and gradient norms within 4.7e-6 relative; after 3
    steps AR / projector / discriminator within 1.5e-7, the tokenizer within 9e-5 (< lr: Adam's first updates are
    ~lr·sign(g), so a rounding-level change of a near-zero gradient moves a weight by up to 2·lr). Checkpoints
    and exports carry the eager names (no `_orig_mod.`); an eager run resumes the compiled checkpoint."""
    import torch._dynamo
    import torch._inductor.config
    from safetensors.torch import load_file

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    steps, lr = 3, 1e-4
    eager, eager_logs = _run_capturing_step_logs(tiny_config(tmp_path / "eager", f"train.max_train_steps={steps}"),
                                                 monkeypatch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_logs = _run_capturing_step_logs(
        tiny_config(tmp_path / "compiled", f"train.max_train_steps={steps}", "train.compile=true"), monkeypatch)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert dict(counters["graph_break"]) == {}
    torch._dynamo.reset()

    for step, (a, b) in enumerate(zip(eager_logs, compiled_logs, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4 if step == 0 else 1e-3, abs=1e-7), (step, key)
    tolerance = {"tokenizer": 3 * lr, "tokenizer_ema": 1e-5, "ar": 1e-6, "ar_ema": 1e-6, "projector": 1e-6,
                 "discriminator": 1e-6}
    got, want = _exported_live_weights(tmp_path / "compiled"), _exported_live_weights(tmp_path / "eager")
    for name, atol in tolerance.items():
        assert got[name].keys() == want[name].keys(), name
        for key, value in want[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=0, atol=atol, msg=f"{name}.{key}")
    for name in ("tokenizer", "ar", "projector", "discriminator"):
        keys = set(getattr(compiled.components, name).state_dict())
        assert not any("_orig_mod" in key for key in keys) and keys == set(getattr(eager.components, name).state_dict())
    final = ckpt.checkpoint_name(steps)
    for file in ("model.safetensors", "model_1.safetensors"):
        assert load_file(str(tmp_path / "compiled" / "checkpoints" / final / file)).keys() == \
            load_file(str(tmp_path / "eager" / "checkpoints" / final / file)).keys()
    resumed = GEARTrainer(tiny_config(tmp_path / "compiled", f"train.max_train_steps={steps + 1}"))
    assert resumed.train(resume_from_checkpoint="latest")["global_step"] == steps + 1


def test_stage_chain_through_the_scripts(tmp_path, capsys):
    """Stage 0 → 1 → 2 via the scripts' `main` with `--init-from`; weights are carried over as documented."""
    from safetensors.torch import load_file

    from gear_hf.models.modeling_gear_tokenizer import GEARTokenizerModel
    from gear_hf.training.gear_step import unwrap
    from gear_hf.training.cli import main

    common = ["--max-train-steps", "1", "--set", "data.max_samples=4", "--set", "train.report_to=none",
              "--set", "train.sample_every=1", "--set", "train.stats_every=1", "--set", "train.num_sample_images=2"]
    s0, s1, s2 = (tmp_path / f"s{i}" for i in range(3))
    assert main(0, ["--config", str(TINY[0]), "--output-dir", str(s0), *common]) == 0
    assert {"checkpoints", "raw", "samples", "tokenizer"} <= {p.name for p in s0.iterdir()}
    assert not (s0 / "ar").exists()

    cfg = TrainingConfig.from_yaml(TINY[1], [f"train.output_dir={s1}", f"train.init_from={s0}", "train.report_to=none",
                                             "data.max_samples=4"])
    tr = GEARTrainer(cfg).build()
    live = GEARTokenizerModel.from_pretrained(s0 / "raw" / "tokenizer").state_dict()
    ema = GEARTokenizerModel.from_pretrained(s0 / "tokenizer").state_dict()
    assert all(torch.equal(v, live[k]) for k, v in unwrap(tr.components.tokenizer).state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in tr.components.tokenizer_ema.model.state_dict().items())
    disc = load_file(str(s0 / "raw" / "discriminator.safetensors"))
    assert all(torch.equal(v, disc[k]) for k, v in unwrap(tr.components.discriminator).state_dict().items())
    tr.accelerator.end_training()

    assert main(1, ["--config", str(TINY[1]), "--output-dir", str(s1), "--init-from", str(s0), *common]) == 0
    assert (s1 / "pipeline" / "model_index.json").is_file()
    assert (s1 / "samples" / "step_00000001_samples.png").is_file()
    assert main(2, ["--config", str(TINY[2]), "--output-dir", str(s2), "--init-from", str(s1), *common]) == 0
    assert json.loads((s2 / "export.json").read_text())["stage"] == 2

    # A config of another stage, and a bad key, are one-line errors (exit code 2).
    capsys.readouterr()
    assert main(2, ["--config", str(TINY[1])]) == 2
    err = capsys.readouterr().err
    assert "is a stage-1 config" in err and "run it with scripts/train_gear.py" in err
    assert main(1, ["--config", str(TINY[1]), "--set", "gear.align_layer=9", "--output-dir", str(tmp_path / "x")]) == 2
    assert "gear.align_layer (ℓ) = 9 must be in [1, 2]" in capsys.readouterr().err


def test_every_preset_parses():
    """Official and tiny presets load; preset names and ℓ are valid for the chosen AR size."""
    from gear_hf.models.configuration_gear_ar import GEARConfig
    from gear_hf.models.configuration_gear_tokenizer import GEARTokenizerConfig

    files = sorted((REPO / "configs").glob("stage*/*.yaml")) + sorted((REPO / "configs" / "tiny").glob("*.yaml"))
    files += sorted((REPO / "configs" / "t2i").glob("*.yaml"))
    assert len(files) >= 23
    for path in files:
        cfg = TrainingConfig.from_yaml(path)
        folder = "t2i" if cfg.data.source in ("gpic", "blip3o") else f"stage{cfg.train.stage}"
        assert path.parent.name in ("tiny", folder), path
        if cfg.tokenizer.preset:
            GEARTokenizerConfig.from_preset(cfg.tokenizer.preset, **cfg.tokenizer.config)
        if cfg.train.stage > 0:
            ar = (GEARConfig.from_preset(cfg.ar.preset, **cfg.ar.config) if cfg.ar.preset
                  else GEARConfig(**{"vocab_size": 64, "image_size": 32, "downsample_factor": 4, **cfg.ar.config}))
            assert 1 <= cfg.gear.align_layer <= ar.num_hidden_layers, path
