"""Parity of GEARForCausalImageLM with the official GEAR AR code (fixtures from
scripts/dev/make_ar_parity_fixtures.py; fp32, TF32 off)."""

from pathlib import Path

import pytest
import torch

from gear_hf.conversion import load_ar_from_official_checkpoint
from gear_hf.models.modeling_gear_ar import build_2d_rope_table

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "ar_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(reference):
    dim, _, heads, _, _, grid = reference["sizes"].tolist()
    model, description = load_ar_from_official_checkpoint(
        FIXTURES / "ar_checkpoint.pt", image_size=grid * 16, num_attention_heads=heads, use_ema=True
    )
    assert "ema" in description
    return model


def test_rope_table_bit_exact(model, reference):
    c = model.config
    table = build_2d_rope_table(c.grid_size, c.head_dim, c.rope_theta, c.cls_token_num)
    assert torch.equal(table, reference["rope_table"])
    assert torch.equal(table[0], torch.zeros_like(table[0]))  # the class position has cos = sin = 0


def test_full_sequence_logits(model, reference):
    with torch.no_grad():
        logits = model(reference["tokens"][:, :-1], reference["labels"]).logits
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max() <= ATOL


def test_soft_input_logits(model, reference):
    with torch.no_grad():
        logits = model(input_probs=reference["soft_inputs"], class_labels=reference["labels"]).logits
    assert (logits - reference["logits_soft"]).abs().max() <= ATOL


def test_hidden_tap(model, reference):
    with torch.no_grad():
        full = model(reference["tokens"][:, :-1], reference["labels"], output_hidden_states=True)
        stopped = model(reference["tokens"][:, :-1], reference["labels"], stop_at_layer=1)
    assert (full.hidden_states[1] - reference["hidden_at_1"]).abs().max() <= ATOL
    assert (stopped.last_hidden_state - reference["hidden_at_1"]).abs().max() <= ATOL
    assert stopped.logits is None


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("greedy_cfg4", {"guidance_scale": 4.0}),
        ("greedy_cfg2_interval3", {"guidance_scale": 2.0, "guidance_interval": 3}),
        ("greedy_nocfg", {"guidance_scale": 1.0}),
    ],
)
def test_greedy_grids(model, reference, name, kwargs):
    grid = model.generate_images(reference["cond_labels"], do_sample=False, **kwargs)
    assert torch.equal(grid, reference[name])


def test_live_weights_selected_without_ema(reference):
    heads = reference["sizes"][2].item()
    live, description = load_ar_from_official_checkpoint(
        FIXTURES / "ar_checkpoint.pt", image_size=64, num_attention_heads=heads, use_ema=False
    )
    ema, _ = load_ar_from_official_checkpoint(FIXTURES / "ar_checkpoint.pt", image_size=64,
                                              num_attention_heads=heads, use_ema=True)
    assert "'ar'" in description
    assert torch.equal(live.norm.weight, ema.norm.weight + 0.5)
