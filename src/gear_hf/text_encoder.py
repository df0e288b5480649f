"""The frozen text encoder of text-to-image GEAR: loading, prompt encoding, the null condition, caption dropout.

Official recipe (official_code_spec §3.3): any `AutoTokenizer` + `AutoModel` text model (default `Qwen/Qwen3-1.7B`,
hidden 2048), frozen; a VLM keeps only its `.language_model` text tower. Prompts are tokenized to exactly
`max_length = 300` positions (right padding, truncation) and the condition is the encoder's `last_hidden_state`
with the tokenizer's attention mask. The unconditional condition (CFG, caption dropout) is the encoding of `""`:
for Qwen3 (no BOS token) that is 300 padding positions with an all-zero mask; BERT-style tokenizers keep
`[CLS] [SEP]` valid.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

from .conditioning import GEARCondition

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-1.7B"
TEXT_MAX_LENGTH = 300  # official `text_max_len` = the AR's text prefix length (`cls_token_num`)

# from_pretrained arguments that concern where the files come from: passed to both the tokenizer and the model.
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code", "force_download", "subfolder")


def load_text_encoder(
    name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **kwargs,
):
    """Load `(tokenizer, text_encoder)` from a Hub id or a local directory; the encoder is frozen and in eval mode.

    `dtype` defaults to bf16 when `device` is CUDA and fp32 otherwise; `device=None` leaves the model on the CPU.
    A model exposing `.language_model` (a VLM such as Qwen3.5) is reduced to that text tower, and an
    encoder-decoder model (T5) to its encoder. Hub arguments in `kwargs` (`revision`, `cache_dir`,
    `local_files_only`, `token`, `trust_remote_code`, ...) reach both loaders, all others only the model.
    """
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(device) if device is not None else None
    if dtype is None:
        dtype = torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        name = str(name_or_path)
        if os.path.isdir(name):
            problem = f"the directory {name!r} does not hold a loadable tokenizer and model ({error})"
        elif os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
            problem = f"{name!r} is not an existing directory"
        else:
            problem = f"the Hub id {name!r} is neither reachable nor in the local cache ({error})"
        raise OSError(
            f"Could not load the text encoder: {problem}. Without network access (or with HF_HUB_OFFLINE=1) pass a "
            "local directory holding config.json, the weights and the tokenizer files (e.g. made by "
            "`hf download Qwen/Qwen3-1.7B --local-dir DIR`), or a Hub id that is already in the local cache."
        ) from error
    if hasattr(model, "language_model"):  # VLM: the vision tower is dropped with the wrapper
        model = model.language_model
    elif getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return tokenizer, model


def text_hidden_size(text_encoder) -> int:
    """Width of the encoder's `last_hidden_state`: the AR's `caption_dim` must equal it."""
    return int(text_encoder.config.hidden_size)


def check_caption_dim(text_encoder, caption_dim) -> None:
    """Raise one clear error when the encoder's hidden size differs from the AR's `caption_dim`.

    `caption_dim`: an int, or an AR config / AR model carrying `caption_dim` (in `.config` for a model).
    """
    source = getattr(caption_dim, "config", caption_dim)
    if not isinstance(source, int):
        source = getattr(source, "caption_dim", None)
    hidden = text_hidden_size(text_encoder)
    if source is None:
        raise ValueError(
            f"The AR has no caption_dim (a class-conditional model) but a text encoder of hidden size {hidden} was "
            f"given; build a text-conditioned AR with caption_dim={hidden}."
        )
    if int(source) != hidden:
        raise ValueError(
            f"The text encoder's hidden size is {hidden} but the AR's caption_dim is {source}. Use a text encoder "
            f"of hidden size {source}, or build the AR with caption_dim={hidden}."
        )


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: str | list[str],
    *,
    max_length: int = TEXT_MAX_LENGTH,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    warn_truncated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts in one batched forward → `(embeds (B, max_length, hidden), mask (B, max_length) int64)`.

    Official tokenization: right padding to exactly `max_length`, truncation; the mask is the tokenizer's
    attention mask (1 = text token, 0 = padding). Only `input_ids` and `attention_mask` reach the encoder (BERT
    tokenizers also return `token_type_ids`), plus `use_cache=False` where its forward takes it: a decoder such as
    Qwen3 would otherwise keep every layer's keys and values of the batch. `device` defaults to the encoder's,
    `dtype` to its output dtype.
    Prompts longer than `max_length` tokens are truncated with one warning per call (`warn_truncated=False`
    silences it, e.g. in a training loop over long captions).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts got an empty list of prompts; pass at least one string ('' = unconditional).")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"Prompt {bad} is a {type(prompts[bad]).__name__}, not a str; pass a list of strings.")
    max_positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if max_positions is not None and max_length > max_positions:
        raise ValueError(
            f"max_length={max_length} exceeds the text encoder's max_position_embeddings={max_positions}; "
            f"use max_length <= {max_positions} (and an AR with that text prefix length) or another encoder."
        )
    encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        padding_side="right", return_tensors="pt")
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"].to(torch.int64)
    if warn_truncated:
        _warn_truncated(tokenizer, prompts, mask, max_length)

    first = next(text_encoder.parameters())
    device = torch.device(device) if device is not None else first.device
    extra = {"use_cache": False} if "use_cache" in inspect.signature(text_encoder.forward).parameters else {}
    with torch.no_grad():
        embeds = text_encoder(input_ids=input_ids.to(first.device), attention_mask=mask.to(first.device),
                              **extra).last_hidden_state
    return embeds.to(device=device, dtype=dtype or embeds.dtype), mask.to(device)


def _warn_truncated(tokenizer, prompts: list[str], mask: torch.Tensor, max_length: int) -> None:
    # Only a full row can have been truncated; re-tokenize those to max_length + 1 (no padding) to tell
    # "exactly max_length tokens" from "longer" without tokenizing huge strings in full.
    full = (mask[:, -1] == 1).nonzero().flatten().tolist()
    if not full:
        return
    lengths = tokenizer([prompts[i] for i in full], truncation=True, max_length=max_length + 1,
                        return_length=True)["length"]
    count = sum(int(n) > max_length for n in lengths)
    if count:
        logger.warning("%d of %d prompts are longer than %d tokens and were truncated to %d tokens.",
                       count, len(prompts), max_length, max_length)


def encode_null_prompt(
    tokenizer,
    text_encoder,
    *,
    max_length: int = TEXT_MAX_LENGTH,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional condition (official): the encoding of `""` → `(embeds (1, L, hidden), mask (1, L))`."""
    return encode_prompts(tokenizer, text_encoder, [""], max_length=max_length, device=device, dtype=dtype)


def drop_captions(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption dropout: replace each sample's (embeds, mask) by the null condition with probability `prob`.

    The official trainer draws `rand(B) < prob` per sample each step; this is the same draw, vectorised and
    without a host sync. `null_embeds` (1, L, hidden) / `null_mask` (1, L) come from `encode_null_prompt`.
    With a `generator` the draw happens on its device (then moves to the embeddings' device).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"Caption dropout probability must be in [0, 1], got {prob}.")
    if prob == 0.0:
        return embeds, mask
    draw_device = generator.device if generator is not None else embeds.device
    drop = torch.rand(embeds.shape[0], device=draw_device, generator=generator).lt(prob).to(embeds.device)
    embeds = torch.where(drop[:, None, None], null_embeds.to(embeds.dtype), embeds)
    mask = torch.where(drop[:, None], null_mask.to(mask.dtype), mask)
    return embeds, mask


class TextConditioner:
    """A frozen text encoder as the condition of a text-to-image AR in training: captions → `GEARCondition`, the
    null condition (the encoding of `""`), and caption dropout. Never trained, never checkpointed."""

    def __init__(self, tokenizer, text_encoder, *, max_length: int = TEXT_MAX_LENGTH, caption_dropout: float = 0.0):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}.")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.requires_grad_(False).eval()
        self.max_length, self.caption_dropout = max_length, caption_dropout
        self._null: GEARCondition | None = None

    @property
    def hidden_size(self) -> int:
        return text_hidden_size(self.text_encoder)

    def to(self, device) -> TextConditioner:
        self.text_encoder.to(device)
        self._null = None
        return self

    def encode(self, captions: list[str]) -> GEARCondition:
        """The captions' condition (no truncation warning: long training captions are expected)."""
        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, captions, max_length=self.max_length,
                                      warn_truncated=False)
        return GEARCondition(text_embeds=embeds, text_attention_mask=mask)

    def null_condition(self) -> GEARCondition:
        """One row: the encoding of `""` (computed once per device)."""
        if self._null is None:
            embeds, mask = encode_null_prompt(self.tokenizer, self.text_encoder, max_length=self.max_length)
            self._null = GEARCondition(text_embeds=embeds, text_attention_mask=mask)
        return self._null

    def drop(self, condition: GEARCondition, generator: torch.Generator | None = None) -> GEARCondition:
        """Caption dropout: each row becomes the null condition with probability `caption_dropout`."""
        null = self.null_condition()
        embeds, mask = drop_captions(condition.text_embeds, condition.text_attention_mask, null.text_embeds,
                                     null.text_attention_mask, self.caption_dropout, generator)
        return GEARCondition(text_embeds=embeds, text_attention_mask=mask)
