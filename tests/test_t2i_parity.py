"""Parity of the text-conditional GEARForCausalImageLM with the official GEAR t2i code (fixtures from
scripts/dev/make_t2i_parity_fixtures.py: padded captions of different lengths, one all padding; fp32, TF32 off)."""

from pathlib import Path

import pytest
import torch

from gear_hf.conversion import load_t2i_from_official_checkpoint
from gear_hf.models.modeling_gear_ar import build_2d_rope_table

FIXTURES = Path(__file__).parent / "fixtures" / "parity" / "t2i"
ATOL = 1e-5
MODES = ("causal", "prefix")


@pytest.fixture(scope="module", params=MODES)
def case(request):
    mode = request.param
    reference = torch.load(FIXTURES / f"t2i_{mode}_reference.pt", weights_only=True)
    heads, grid = reference["sizes"][2].item(), reference["sizes"][4].item()
    model, description = load_t2i_from_official_checkpoint(
        FIXTURES / f"t2i_{mode}_checkpoint.pt", image_size=grid * 16, num_attention_heads=heads)
    assert "['ema']" in description and "(checkpoint args)" in description
    return mode, model, reference


def official_image_rows(reference, name):
    """The official eval forward returns every position; ours the rows from the last text slot on."""
    text_length = reference["sizes"][6].item()
    return reference[name][:, text_length - 1:]


def test_config_from_weights_and_saved_args(case):
    mode, model, reference = case
    c = model.config
    assert c.condition_type == "text" and c.text_attention == mode
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size, c.grid_size, c.caption_dim,
            c.text_length) == tuple(reference["sizes"].tolist())
    assert c.num_double_stream_layers == reference["n_double"].item() == 1


def test_rope_table_bit_exact(case):
    _, model, reference = case
    c = model.config
    table = build_2d_rope_table(c.grid_size, c.head_dim, c.rope_theta, c.prefix_length)
    assert torch.equal(table, reference["rope_table"])
    assert not table[: c.text_length].any()  # text rows are zero: text queries and keys vanish


def test_full_sequence_logits(case):
    _, model, reference = case
    with torch.no_grad():
        out = model(reference["tokens"][:, :-1], text_embeds=reference["text_embeds"],
                    text_attention_mask=reference["text_mask"])
    expected = official_image_rows(reference, "logits")
    assert out.logits.shape == expected.shape == (3, 16, 64)
    assert (out.logits - expected).abs().max() <= ATOL


def test_soft_input_logits(case):
    _, model, reference = case
    with torch.no_grad():
        logits = model(input_probs=reference["soft_inputs"], text_embeds=reference["text_embeds"],
                       text_attention_mask=reference["text_mask"]).logits
    assert (logits - official_image_rows(reference, "logits_soft")).abs().max() <= ATOL


def test_hidden_tap_and_truncated_pass(case):
    _, model, reference = case
    kwargs = dict(text_embeds=reference["text_embeds"], text_attention_mask=reference["text_mask"])
    with torch.no_grad():
        full = model(reference["tokens"][:, :-1], output_hidden_states=True, **kwargs)
        stopped = model(reference["tokens"][:, :-1], stop_at_layer=2, **kwargs)
    expected = official_image_rows(reference, "hidden_at_2")
    assert (full.hidden_states[2] - expected).abs().max() <= ATOL
    assert (stopped.last_hidden_state - expected).abs().max() <= ATOL and stopped.logits is None


@pytest.mark.parametrize("name, kwargs", [
    ("greedy_cfg3", {"guidance_scale": 3.0}),
    ("greedy_cfg2_interval3", {"guidance_scale": 2.0, "guidance_interval": 3}),
    ("greedy_nocfg", {"guidance_scale": 1.0}),
])
def test_greedy_grids(case, name, kwargs):
    _, model, reference = case
    text_length = reference["sizes"][6].item()
    grid = model.generate_images(
        text_embeds=reference["text_embeds"][:2], text_attention_mask=reference["text_mask"][:2],
        null_text_embeds=reference["uncond_embeds"],
        null_text_attention_mask=torch.zeros(1, text_length, dtype=torch.long), do_sample=False, **kwargs)
    assert torch.equal(grid, reference[name])


def test_cached_decoding_equals_full_forward_at_every_position(case):
    _, model, reference = case
    tokens, text, mask = reference["tokens"], reference["text_embeds"], reference["text_mask"]
    with torch.no_grad():
        full = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask).logits
        cache = model.allocate_kv_cache(3)
        steps = [model(text_embeds=text, text_attention_mask=mask, cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(tokens.shape[1] - 1)]
    assert cache.seq_length == model.max_sequence_length - 1  # prefix + every image token but the last
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL


def test_live_weights_selected_without_ema(case):
    mode, model, reference = case
    live, description = load_t2i_from_official_checkpoint(
        FIXTURES / f"t2i_{mode}_checkpoint.pt", image_size=64, num_attention_heads=4, use_ema=False)
    assert "['ar']" in description
    assert torch.equal(live.norm.weight, model.norm.weight + 0.5)
