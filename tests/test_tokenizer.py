"""Unit tests of the GEAR tokenizer: config, quantizers, read-outs, model API, strict conversion, serialisation."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import gear_hf
from gear_hf import GEARTokenizerConfig, GEARTokenizerModel
from gear_hf.conversion import (
    CheckpointMismatchError,
    load_tokenizer_from_official_checkpoint,
    select_tokenizer_state_dict,
)
from gear_hf.models.quantizers import (
    IndexBackpropQuantizer,
    LookupFreeQuantizer,
    VectorQuantizer,
    entropy_loss,
    hard_readout,
    soft_readout,
)

QUANTIZERS = ["vq", "lfq", "ibq"]
REPO = Path(__file__).resolve().parents[1]


def from_official(path, config, **kwargs):
    return load_tokenizer_from_official_checkpoint(path, config, **kwargs)[0]


def tiny_config(quantizer: str, **overrides) -> GEARTokenizerConfig:
    fields = {"quantizer": quantizer, "codebook_size": 64, "base_channels": 32, "channel_multipliers": [1, 1],
              "num_res_blocks": 1, "image_size": 16}
    if quantizer != "lfq":
        fields.update(codebook_embed_dim=8, z_channels=16)
    return GEARTokenizerConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {q: GEARTokenizerModel(tiny_config(q)).eval() for q in QUANTIZERS}


def images(batch=2, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------------ config
def test_presets_match_released_architectures():
    vq, lfq, ibq = (GEARTokenizerConfig.from_preset(n) for n in ("VQ-16", "LFQ-16", "IBQ-16"))
    assert (vq.codebook_embed_dim, lfq.codebook_embed_dim, ibq.codebook_embed_dim) == (8, 14, 256)
    assert (vq.num_res_blocks, lfq.num_res_blocks, ibq.num_res_blocks) == (2, 4, 4)
    for config in (vq, lfq, ibq):
        assert config.codebook_size == 16384 and config.image_size == 256 and config.downsample_factor == 16
        assert config.channel_multipliers == [1, 1, 2, 2, 4] and config.base_channels == 128
    assert lfq.attention_levels == [] and vq.attention_levels == ibq.attention_levels == [4]
    assert (vq.commit_loss_beta, vq.entropy_loss_ratio, vq.entropy_temperature) == (0.25, 0.05, 0.01)
    # Defaults of a bare family config equal its preset.
    assert GEARTokenizerConfig(quantizer="lfq").to_dict() == lfq.to_dict()
    assert GEARTokenizerConfig(quantizer="lfq", codebook_size=1024).codebook_embed_dim == 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantizer": "fsq"}, "Unknown quantizer 'fsq'"),
        ({"quantizer": "lfq", "codebook_size": 1000}, "power of two"),
        ({"quantizer": "lfq", "codebook_embed_dim": 8}, "log2(codebook_size) = 14"),
        ({"image_size": 250}, "not divisible by the downsample factor 16"),
        ({"base_channels": 48}, "divisible by 32"),
        ({"quantizer": "lfq", "attention_levels": [4]}, "no attention"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GEARTokenizerConfig(**kwargs)


# -------------------------------------------------------------------------------------------------- quantizers
def test_lfq_bit_order_channel_zero_is_least_significant():
    quantizer = LookupFreeQuantizer(codebook_size=16384, embed_dim=14).eval()
    bits = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1])
    z = (bits.float() * 2 - 1).view(1, 14, 1, 1) * 0.3
    out = quantizer(z, return_assignment=True)
    assert out.indices.item() == 9691 == sum(int(b) << i for i, b in enumerate(bits))
    assert torch.equal(quantizer.codes_from_indices(torch.tensor(9691)), bits.float() * 2 - 1)
    assert out.assignment_logits.argmax(-1).item() == 9691
    # A zero channel counts as a 0 bit (sign -1).
    assert quantizer(torch.zeros(1, 14, 1, 1)).indices.item() == 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_shapes_hard_readout_and_index_code_round_trip(models, quantizer):
    model = models[quantizer]
    config = model.config
    with torch.no_grad():
        out = model.encode(images(), return_assignment=True)
    h = 16 // config.downsample_factor
    assert out.indices.shape == (2, h, h) and out.indices.dtype == torch.int64
    assert out.quantized.shape == (2, config.codebook_embed_dim, h, h)
    assert out.assignment_logits.shape == (2, h * h, config.codebook_size)
    assert torch.equal(hard_readout(out.assignment_logits), out.indices.flatten(1))
    # The quantized latent is the code of its token.
    codes = model.quantize.codes_from_indices(out.indices).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, codes, rtol=0, atol=1e-6)
    # Quantizing the codes themselves gives the tokens back (VQ: unit-norm rows; LFQ: sign patterns).
    if quantizer != "ibq":
        all_ids = torch.arange(config.codebook_size)
        latent = model.quantize.codes_from_indices(all_ids).T.reshape(1, -1, 1, config.codebook_size)
        assert torch.equal(model.quantize(latent).indices.flatten(), all_ids)
    else:
        assert torch.equal(model.quantize.codes_from_indices(out.indices), model.quantize.embedding.weight[out.indices])


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_encode_returns_the_pre_quantization_latent_on_request(models, quantizer):
    model = models[quantizer]
    with torch.no_grad():
        plain = model.encode(images())
        out = model.encode(images(), return_latent=True)
        # The latent is the encoder (→ quant_conv) output, and the quantizer maps it to the same tokens and codes.
        expected = model.quant_conv(model.encoder(images()))
        requantized = model.quantize(out.latent)
    assert plain.latent is None
    assert out.latent.shape == out.quantized.shape
    torch.testing.assert_close(out.latent, expected, rtol=0, atol=0)
    assert torch.equal(requantized.indices, out.indices) and torch.equal(out.indices, plain.indices)
    torch.testing.assert_close(requantized.quantized, out.quantized, rtol=0, atol=0)


def test_vq_codes_are_l2_normalised(models):
    codes = models["vq"].quantize.codes_from_indices(torch.arange(64))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(64))


def test_ibq_gather_equals_dense_one_hot_product():
    torch.manual_seed(1)
    quantizer = IndexBackpropQuantizer(codebook_size=64, embed_dim=16).eval()
    z = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        gathered = quantizer(z).quantized  # no gradient needed: gather path
    dense = quantizer(z.clone().requires_grad_(True)).quantized  # straight-through one-hot @ codebook
    assert dense.requires_grad
    assert torch.equal(gathered, dense.detach())
    hard = torch.nn.functional.one_hot(quantizer(z).indices.flatten(), 64).float()
    assert torch.equal(gathered.permute(0, 2, 3, 1).reshape(-1, 16), hard @ quantizer.embedding.weight.detach())


def test_soft_readout_tends_to_hard_readout():
    logits = torch.randn(3, 10, 50, generator=torch.Generator().manual_seed(0))
    hard = hard_readout(logits)
    for temperature in (1.0, 0.1):
        soft = soft_readout(logits, temperature)
        torch.testing.assert_close(soft.sum(-1), torch.ones(3, 10))
    cold = soft_readout(logits.bfloat16(), 1e-4)
    assert cold.dtype == torch.float32
    assert torch.equal(cold.argmax(-1), hard_readout(logits.bfloat16()))
    sharp = soft_readout(logits, 1e-4)
    torch.testing.assert_close(sharp, torch.nn.functional.one_hot(hard, 50).float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        soft_readout(logits, 0.0)


def test_entropy_loss_against_hand_computation():
    rows = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    temperature = 0.5

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    probs = [softmax([v / temperature for v in row]) for row in rows]
    shifted = [softmax([v / temperature + 1e-5 for v in row]) for row in rows]  # the 1e-5 shift cancels
    sample = -sum(sum(p * math.log(q) for p, q in zip(pr, qr)) for pr, qr in zip(probs, shifted)) / len(rows)
    avg = [sum(col) / len(rows) for col in zip(*probs)]
    avg_entropy = -sum(p * math.log(p + 1e-5) for p in avg)

    loss, sample_entropy, avg_ent = entropy_loss(torch.tensor(rows), temperature=temperature,
                                                 sample_weight=1.0, avg_weight=1.0)
    assert sample_entropy.item() == pytest.approx(sample, abs=1e-6)
    assert avg_ent.item() == pytest.approx(avg_entropy, abs=1e-6)
    assert loss.item() == pytest.approx(sample - avg_entropy, abs=1e-6)
    weighted, _, _ = entropy_loss(torch.tensor(rows), temperature=temperature, sample_weight=2.0, avg_weight=0.5)
    assert weighted.item() == pytest.approx(2 * sample - 0.5 * avg_entropy, abs=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_entropy_loss_uses_global_average_with_local_gradient(monkeypatch, chunked):
    """Under DDP the avg-entropy value uses the all-reduced p-bar; its gradient flows through the local p-bar
    (for the dense and the row-chunked formula alike)."""
    import gear_hf.models.quantizers as quantizers

    other_rank_avg = torch.tensor([0.7, 0.2, 0.1])

    def fake_all_reduce(tensor, op=None):
        tensor += other_rank_avg  # sum over two ranks

    monkeypatch.setattr(quantizers.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(quantizers.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(quantizers.dist, "all_reduce", fake_all_reduce)

    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], requires_grad=True)
    _, _, avg_entropy = entropy_loss(logits, temperature=1.0, sync_across_ranks=True, chunked=chunked)
    local_avg = torch.softmax(logits.detach(), -1).mean(0)
    global_avg = (local_avg + other_rank_avg) / 2
    assert avg_entropy.item() == pytest.approx(-(global_avg * torch.log(global_avg + 1e-5)).sum().item(), abs=1e-6)
    avg_entropy.backward()
    # d H / d p-bar at the global p-bar, chained through the local p-bar only.
    slope = -(torch.log(global_avg + 1e-5) + global_avg / (global_avg + 1e-5))
    surrogate_logits = logits.detach().clone().requires_grad_(True)
    (torch.softmax(surrogate_logits, -1).mean(0) * slope).sum().backward()
    torch.testing.assert_close(logits.grad, surrogate_logits.grad)
    # Without sync (eval / rank-divergent code paths) nothing is reduced.
    _, _, local_only = entropy_loss(logits, temperature=1.0, sync_across_ranks=False, chunked=chunked)
    assert local_only.item() == pytest.approx(-(local_avg * torch.log(local_avg + 1e-5)).sum().item(), abs=1e-6)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_training_outputs_losses_and_gradients(quantizer):
    torch.manual_seed(0)
    model = GEARTokenizerModel(tiny_config(quantizer)).train()
    out = model(images(), return_assignment=True)
    for name in ("codebook_loss", "commitment_loss", "entropy_loss", "sample_entropy", "avg_entropy"):
        assert getattr(out, name).ndim == 0 and torch.isfinite(getattr(out, name))
    assert torch.equal(out.quantizer_loss, out.codebook_loss + out.commitment_loss + out.entropy_loss)
    _, sample, avg = entropy_loss(out.assignment_logits, temperature=0.01)
    torch.testing.assert_close(out.entropy_loss, 0.05 * (sample - avg))
    assert torch.equal(out.assignment_logits.argmax(-1), out.indices.flatten(1))
    # Straight-through: the reconstruction loss reaches the encoder; so does a loss on the soft assignment.
    out.reconstruction.square().mean().backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.zero_grad()
    soft_readout(out.assignment_logits, 0.1).max(-1).values.mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        eval_out = model(images())
    assert eval_out.quantizer_loss is None and eval_out.codebook_loss is None and eval_out.assignment_logits is None


# --------------------------------------------------------------------------------------------------- model API
def test_decode_accepts_grid_or_flat_indices(models):
    model = models["vq"]
    with torch.no_grad():
        out = model(images())
        from_grid = model.decode(out.indices)
        from_flat = model.decode(out.indices.flatten(1))
    assert from_grid.shape == (2, 3, 16, 16)
    assert torch.equal(from_grid, from_flat)
    torch.testing.assert_close(from_grid, out.reconstruction, rtol=0, atol=1e-5)


def test_bad_inputs_raise_or_warn(models):
    model = models["lfq"]
    with pytest.raises(ValueError, match="4 channels but the tokenizer expects 3"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        model.encode(torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match="pixel_values\\[None\\]"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.warns(UserWarning, match="pixels / 127.5 - 1") as record:
        model(torch.full((1, 3, 16, 16), 255.0))
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(images())  # in range: silent
    with pytest.raises(ValueError, match=r"must lie in \[0, 63\]"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 63\]"):
        model.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match="not a square"):
        model.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode(torch.zeros(1, 8, 8))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_save_and_from_pretrained_round_trip_bit_exact(models, quantizer, tmp_path):
    model = models[quantizer]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = GEARTokenizerModel.from_pretrained(tmp_path).eval()
    fields = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert fields(reloaded.config) == fields(model.config)
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys()
    assert all(torch.equal(state[k], reloaded_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(images()).reconstruction, reloaded(images()).reconstruction)


def test_auto_classes_after_import(models, tmp_path):
    from transformers import AutoConfig, AutoModel

    assert gear_hf.GEARTokenizerModel is GEARTokenizerModel
    models["ibq"].save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, GEARTokenizerConfig) and config.quantizer == "ibq"
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, GEARTokenizerModel)
    assert torch.equal(model.quantize.embedding.weight, models["ibq"].quantize.embedding.weight)
    assert isinstance(AutoModel.from_config(tiny_config("vq")), GEARTokenizerModel)


def test_init_weights_initialises_codebooks():
    torch.manual_seed(0)
    vq = GEARTokenizerModel(tiny_config("vq"))
    torch.testing.assert_close(vq.quantize.embedding.weight.norm(dim=-1), torch.ones(64))
    ibq = GEARTokenizerModel(tiny_config("ibq"))
    assert 0.5 < ibq.quantize.embedding.weight.std().item() < 1.5
    assert isinstance(vq.quantize, VectorQuantizer) and isinstance(ibq.quantize, IndexBackpropQuantizer)


# ------------------------------------------------------------------------------------------ strict conversion
def save_bare(model, path, edit=None):
    state = dict(model.state_dict())
    if edit:
        edit(state)
    torch.save(state, path)
    return path


def test_strict_loading_accepts_exact_and_ignores_codebook_used(models, tmp_path):
    model = models["vq"]
    path = save_bare(model, tmp_path / "ok.pt", lambda s: s.update({"quantize.codebook_used": torch.zeros(65536)}))
    loaded = from_official(path, model.config)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decoder.conv_out.bias"), "1 missing keys:\n  decoder.conv_out.bias"),
        (lambda s: s.update({"decoder.extra.weight": torch.zeros(1)}), "1 unexpected keys:\n  decoder.extra.weight"),
        (lambda s: s.update({"decoder.conv_out.bias": torch.zeros(4)}), "decoder.conv_out.bias: checkpoint (4,) vs model (3,)"),
    ],
)
def test_strict_loading_errors(models, tmp_path, edit, message):
    path = save_bare(models["ibq"], tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
        from_official(path, models["ibq"].config)


def test_codebook_size_and_quantizer_mismatch_errors(models, tmp_path):
    vq_path = save_bare(models["vq"], tmp_path / "vq.pt")
    with pytest.raises(CheckpointMismatchError, match="codebook of 64 codes, but config.codebook_size=128"):
        from_official(vq_path, tiny_config("vq", codebook_size=128))
    with pytest.raises(CheckpointMismatchError, match="holds a VQ .* tokenizer, but config.quantizer='ibq'"):
        from_official(vq_path, tiny_config("ibq"))
    lfq_path = save_bare(models["lfq"], tmp_path / "lfq.pt")
    with pytest.raises(CheckpointMismatchError, match="codebook of 64 codes, but config.codebook_size=256"):
        from_official(lfq_path, tiny_config("lfq", codebook_size=256))
    with pytest.raises(CheckpointMismatchError, match="LFQ .* but config.quantizer='vq'"):
        from_official(lfq_path, tiny_config("vq"))


def test_select_tokenizer_state_dict_layouts():
    weights = {"encoder.conv_in.weight": torch.ones(1), "decoder.conv_out.bias": torch.ones(1)}
    ema = {k: v * 2 for k, v in weights.items()}

    state, note = select_tokenizer_state_dict({"model": {"_orig_mod." + k: v for k, v in weights.items()}}, use_ema=False)
    assert state.keys() == weights.keys() and "LlamaGen" in note

    state, note = select_tokenizer_state_dict({"vq": weights, "vq_ema": ema, "steps": 3}, use_ema=True)
    assert torch.equal(state["encoder.conv_in.weight"], ema["encoder.conv_in.weight"]) and "'vq_ema'" in note
    state, note = select_tokenizer_state_dict({"vq": weights, "vq_ema": ema}, use_ema=False)
    assert torch.equal(state["encoder.conv_in.weight"], weights["encoder.conv_in.weight"]) and "--ema" in note
    state, note = select_tokenizer_state_dict({"vq": weights}, use_ema=True)
    assert "no 'vq_ema'" in note
    with pytest.raises(CheckpointMismatchError, match="use_ema=True"):
        select_tokenizer_state_dict({"vq_ema": ema}, use_ema=False)

    lightning = {"state_dict": {**weights, "model_ema.encoderconv_inweight": ema["encoder.conv_in.weight"],
                                "model_ema.decay": torch.tensor(0.9), "loss.discriminator.w": torch.ones(1)}}
    state, note = select_tokenizer_state_dict(lightning, use_ema=False)
    assert state.keys() == weights.keys()
    assert torch.equal(state["encoder.conv_in.weight"], ema["encoder.conv_in.weight"])
    assert torch.equal(state["decoder.conv_out.bias"], weights["decoder.conv_out.bias"])
    assert "EMA weights (model_ema.*) for 1 of 2" in note and "loss" in note

    with pytest.raises(CheckpointMismatchError, match="Stage-2 checkpoints"):
        select_tokenizer_state_dict({"ar": weights, "ema": weights, "steps": 1}, use_ema=False)


def test_convert_script_writes_loadable_directory(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fixture = REPO / "tests" / "fixtures" / "parity" / "vq"
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(json.loads((fixture / "case.json").read_text())["config"]))
    out_dir = tmp_path / "converted"
    script.main(["tokenizer", "--quantizer", "vq", "--checkpoint", str(fixture / "checkpoint.pt"),
                 "--output", str(out_dir), "--ema", "--config", str(config_path)])
    assert "Weights used: GEAR training checkpoint: using 'vq_ema'" in capsys.readouterr().out
    converted = GEARTokenizerModel.from_pretrained(out_dir)
    reference = from_official(
        fixture / "checkpoint.pt", GEARTokenizerConfig(**json.loads(config_path.read_text())), use_ema=True
    )
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(SystemExit):
        script.main(["tokenizer", "--quantizer", "fsq", "--checkpoint", "x", "--output", "y"])


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantizer_runs_in_fp32_under_bf16_autocast(models, quantizer):
    """Assignment logits and tokens are computed in fp32 even inside a bf16 autocast region."""
    model = models[quantizer]
    x = images()
    reference = model.encode(x, return_assignment=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = model.quant_conv(model.encoder(x))
        out = model.quantize(latent.float(), return_assignment=True)
    assert out.assignment_logits.dtype == torch.float32
    # Same latent in, same tokens out: the quantizer itself is not affected by autocast.
    exact = model.quantize(latent.float(), return_assignment=True)
    assert torch.equal(out.indices, exact.indices)
    torch.testing.assert_close(out.assignment_logits, exact.assignment_logits, rtol=0, atol=0)
    assert reference.assignment_logits.dtype == torch.float32
