"""LlamaGen transformer: GEAR's autoregressive image-token generator, class- or text-conditional.

Blocks appear in the order data meets them: RMSNorm, 2-D rotary embedding, SwiGLU, attention (with a static
KV cache for sampling), decoder layer, condition embeddings, then the model. Parameter names follow the official
GEAR / LlamaGen checkpoints one-to-one (`tok_embeddings`, `layers.{i}.attention.wqkv`, `output`, ...; text models:
`cls_embedding.cap_proj.fc{1,2}`, `layers.{i}.attention.wqkv_text` / `wo_text`, `layers.{i}.attention_norm_text`),
so official weights load strictly without renaming.

The sequence is `[prefix] + image tokens`: one class token, or `text_length` projected text-encoder features. The
prefix positions get all-zero rotary rows, so their queries and keys vanish in every layer (inherited from LlamaGen,
kept for checkpoint parity). Text models give the text positions of the first `num_double_stream_layers` blocks
their own attention projections and norm (one joint attention over both streams) and mask padded text positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from ..hub import GEARHubMixin
from ..sampling import generate_image_tokens
from .configuration_gear_ar import GEARConfig
from .quantizers import soft_embed


class GEARRMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back to the input dtype before the (learned) scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return x.type_as(hidden_states) * self.weight


def build_2d_rope_table(grid_size: int, head_dim: int, theta: float, num_prefix: int = 1) -> torch.Tensor:
    """Cos/sin table of LlamaGen's 2-D rotary embedding, shape `(num_prefix + grid_size**2, head_dim // 2, 2)`.

    The `head_dim // 2` rotary pairs are split in two halves: the first half rotates by the token's grid row, the
    second by its column (same frequencies for both). Grid cells are in raster order. The `num_prefix` class
    positions get all-zero rows (cos = sin = 0), not the identity: their queries and keys become exactly zero, as
    in LlamaGen, so every query gives the class token attention logit 0. Kept bit-exact with the reference.
    """
    quarter = head_dim // 4
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[:quarter].float() / half))
    angles = torch.outer(torch.arange(grid_size), freqs)  # (grid, quarter)
    grid_angles = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (row, col, half): [row angles | column angles]
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(num_prefix, half, 2), table])


def apply_2d_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs `(x[2j], x[2j+1])` of `x` (B, S, H, D) by `table` (S, D/2, 2), in fp32."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class GEARSwiGLU(nn.Module):
    """Feed-forward `w2(silu(w1 x) * w3 x)` followed by dropout."""

    def __init__(self, config: GEARConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states)))


class GEARKVCache:
    """Static key/value buffers for incremental decoding, allocated once.

    `keys[i]`/`values[i]` hold layer `i`, each of shape `(batch_size, num_heads, max_length, head_dim)`. Each
    attention layer writes its new keys/values at positions `[seq_length, seq_length + q_len)` and reads the valid
    prefix back as views; the model calls `advance(q_len)` once all layers ran. A call with fewer rows than
    `batch_size` updates only the leading rows (used to drop the unconditional CFG half once guidance stops); the
    other rows then go stale and must not be read again.

    The static-shape decode step (`write`, `step_mask`) takes its position as a tensor instead, neither reads nor
    advances `seq_length`, and writes every row: `keep_rows` shrinks the cache first. (Separate buffers per layer,
    each written whole, let `torch.compile` update them in place instead of copying the cache every step.)

    Text models also keep `key_mask` `(batch_size, max_length)`: which cached positions may be attended (False for
    padded text positions, written when the text prefix runs; True elsewhere).
    """

    def __init__(self, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str, with_key_mask: bool = False):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device) if with_key_mask else None
        self.seq_length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, start, end = key.shape[0], self.seq_length, self.seq_length + key.shape[2]
        if rows > self.batch_size or end > self.max_length:
            raise ValueError(
                f"KV cache of batch {self.batch_size} x length {self.max_length} cannot take {rows} rows at "
                f"positions [{start}, {end})."
            )
        self.keys[layer_idx][:rows, :, start:end] = key
        self.values[layer_idx][:rows, :, start:end] = value
        return self.keys[layer_idx][:rows, :, :end], self.values[layer_idx][:rows, :, :end]

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
              position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The static-shape update of `GEARForCausalImageLM.decode_step`: write every row's key/value at `position`
        (a `(1,)` LongTensor, never a Python int) and return the whole buffers (attend under `step_mask`)."""
        if key.shape[0] != self.batch_size:
            raise ValueError(f"The static decode step writes all {self.batch_size} rows of the cache, got "
                             f"{key.shape[0]}: shrink the cache with keep_rows({key.shape[0]}) first.")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, position, key.to(keys.dtype))
        values.index_copy_(2, position, value.to(values.dtype))
        return keys, values

    def step_mask(self, position: torch.Tensor) -> torch.Tensor:
        """`(batch_size or 1, 1, 1, max_length)` boolean: the cached keys a query at `position` may attend
        (positions <= `position`, and valid per `key_mask` for text models)."""
        mask = torch.arange(self.max_length, device=position.device) <= position
        if self.key_mask is not None:
            mask = mask & self.key_mask
        return mask.view(-1, 1, 1, self.max_length)

    def keep_rows(self, num_rows: int) -> None:
        """Keep only the first `num_rows` rows (copied once into smaller buffers, layer by layer), e.g. the
        conditional half of a CFG batch once guidance stops."""
        self.keys = [k[:num_rows].clone() for k in self.keys]
        self.values = [v[:num_rows].clone() for v in self.values]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:num_rows].clone()

    def advance(self, num_positions: int) -> None:
        self.seq_length += num_positions

    def reset(self) -> None:
        self.seq_length = 0


def by_stream(x: torch.Tensor, num_text: int, text: nn.Module | None, image: nn.Module) -> torch.Tensor:
    """`text` on the first `num_text` positions of `x` (B, S, D), `image` on the rest (one call when a stream is
    empty or there is no text module)."""
    if text is None or num_text == 0:
        return image(x)
    if num_text == x.shape[1]:
        return text(x)
    return torch.cat([text(x[:, :num_text]), image(x[:, num_text:])], dim=1)


class GEARAttention(nn.Module):
    """Multi-head self-attention with a fused `wqkv` projection and 2-D RoPE on queries and keys.

    With `has_text_stream`, the leading `num_text` positions of a call are projected by `wqkv_text` / `wo_text`
    and the rest by `wqkv` / `wo`; queries, keys and values of both streams go through one joint attention.
    """

    def __init__(self, config: GEARConfig, layer_idx: int, has_text_stream: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.attn_dropout_prob = config.attn_dropout_prob
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.has_text_stream = has_text_stream
        if has_text_stream:
            self.wqkv_text = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
            self.wo_text = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, rope_table: torch.Tensor, cache: GEARKVCache | None = None,
                attention_mask: torch.Tensor | None = None, num_text: int = 0,
                position: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        qkv = by_stream(hidden_states, num_text, getattr(self, "wqkv_text", None), self.wqkv)
        query, key, value = qkv.split(self.hidden_size, dim=-1)
        query = apply_2d_rope(query.view(heads), rope_table).transpose(1, 2)
        key = apply_2d_rope(key.view(heads), rope_table).transpose(1, 2)
        value = value.view(heads).transpose(1, 2)

        past = 0
        if position is not None:  # static decode step: the whole cache, under `attention_mask` (its step_mask)
            key, value = cache.write(self.layer_idx, key, value, position)
        elif cache is not None:
            past = cache.seq_length
            key, value = cache.update(self.layer_idx, key, value)
        mask = attention_mask
        if mask is None and past > 0 and length > 1:  # a chunk appended to a cache: bottom-right causal mask
            mask = torch.ones(length, past + length, dtype=torch.bool, device=query.device).tril(diagonal=past)
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None and past == 0 and length > 1,
            dropout_p=self.attn_dropout_prob if self.training else 0.0,
        )
        attn = attn.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.resid_dropout(by_stream(attn, num_text, getattr(self, "wo_text", None), self.wo))


class GEARDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Llama block: `h = x + Attn(norm(x))`, `out = h + FFN(norm(h))`. With a text stream, text positions
    use their own pre-attention norm and projections; the FFN and its norm are shared."""

    def __init__(self, config: GEARConfig, layer_idx: int):
        super().__init__()
        has_text_stream = layer_idx < config.num_double_stream_layers
        self.attention_norm = GEARRMSNorm(config.hidden_size, config.rms_norm_eps)
        if has_text_stream:
            self.attention_norm_text = GEARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = GEARAttention(config, layer_idx, has_text_stream)
        self.ffn_norm = GEARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = GEARSwiGLU(config)

    def forward(self, hidden_states: torch.Tensor, rope_table: torch.Tensor, cache: GEARKVCache | None = None,
                attention_mask: torch.Tensor | None = None, num_text: int = 0,
                position: torch.Tensor | None = None) -> torch.Tensor:
        normed = by_stream(hidden_states, num_text, getattr(self, "attention_norm_text", None), self.attention_norm)
        hidden_states = hidden_states + self.attention(normed, rope_table, cache=cache, attention_mask=attention_mask,
                                                       num_text=num_text, position=position)
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class GEARClassEmbedding(nn.Module):
    """Class-label embedding; in training, labels become the null class with probability `class_dropout_prob`."""

    def __init__(self, config: GEARConfig):
        super().__init__()
        self.null_class_id = config.null_class_id
        self.dropout_prob = config.class_dropout_prob
        self.embedding_table = nn.Embedding(config.num_class_embeddings, config.hidden_size)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(class_labels.shape[0], device=class_labels.device) < self.dropout_prob
            class_labels = torch.where(drop, self.null_class_id, class_labels)
        return self.embedding_table(class_labels).unsqueeze(1)


class GEARCaptionProjection(nn.Module):
    """`fc2(gelu_tanh(fc1(x)))`, no biases: text-encoder features (caption_dim) -> hidden_size."""

    def __init__(self, config: GEARConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.caption_dim, config.hidden_size, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GEARCaptionEmbedding(nn.Module):
    """Projects frozen text-encoder features to the prefix embeddings. There is no learned unconditional
    embedding: the unconditional condition is the encoding of the empty prompt, supplied by the caller (as is
    caption dropout in training)."""

    def __init__(self, config: GEARConfig):
        super().__init__()
        self.cap_proj = GEARCaptionProjection(config)

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(text_embeds)


def text_attention_mask_for(key_valid: torch.Tensor, past: int, length: int, text_length: int,
                            mode: str) -> torch.Tensor:
    """Boolean attention mask `(B, 1, length, past + length)` (True = attend) for positions `[past, past+length)`
    of a text-conditional sequence. `key_valid` `(B, past + length)` marks attendable keys (False = padded text).

    `"causal"`: query q sees valid keys k <= q. `"prefix"`: every query sees every valid text key; image keys
    causally; text queries never see image keys. Both: the diagonal is always visible (a padded text position
    still attends to itself, so no row is empty)."""
    device = key_valid.device
    q = torch.arange(past, past + length, device=device)[:, None]
    k = torch.arange(past + length, device=device)[None, :]
    causal = k <= q
    if mode == "prefix":
        allowed = torch.where(k < text_length, key_valid[:, None, :], causal[None])
    else:
        allowed = causal[None] & key_valid[:, None, :]
    return (allowed | (k == q)[None]).unsqueeze(1)


def check_class_labels(config: GEARConfig, class_labels: torch.Tensor, *, allow_null: bool = True,
                       check_values: bool = True) -> None:
    """Raise ValueError unless every label is in [0, num_classes) or the embeddable null class.

    The value check reads the labels back to the host; `check_values=False` checks only dtype and shape."""
    if config.is_text_conditional:
        raise ValueError("This model is text-conditional (condition_type='text'): pass text_embeds=(B, L, C) and "
                         "text_attention_mask=(B, L) instead of class_labels.")
    if class_labels.dim() != 1 or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be a 1-D integer tensor (B,), got {class_labels.dtype} "
                         f"{tuple(class_labels.shape)}.")
    if class_labels.numel() == 0 or not check_values:
        return
    upper = config.num_classes + int(allow_null and config.has_null_class)  # exclusive
    low, high = int(class_labels.min()), int(class_labels.max())
    if low < 0 or high >= upper:
        null_note = (f" (index {config.null_class_id} = null class)" if upper > config.num_classes else
                     " (this model has no null class: class_dropout_prob == 0)" if allow_null else "")
        raise ValueError(f"class_labels must lie in [0, {upper - 1}]{null_note}; got values in [{low}, {high}].")


def check_text_condition(config: GEARConfig, text_embeds: torch.Tensor,
                         text_attention_mask: torch.Tensor | None) -> None:
    """Raise ValueError unless `text_embeds` is `(B, text_length, caption_dim)` with a matching `(B, L)` mask."""
    if not config.is_text_conditional:
        raise ValueError("This model is class-conditional (condition_type='class'): pass class_labels=(B,), not "
                         "text_embeds.")
    if text_embeds.dim() != 3 or not text_embeds.is_floating_point():
        raise ValueError(f"text_embeds must be a float tensor (B, L, C), got {text_embeds.dtype} "
                         f"{tuple(text_embeds.shape)}.")
    if text_embeds.shape[-1] != config.caption_dim:
        raise ValueError(
            f"text_embeds have {text_embeds.shape[-1]} channels but this model's caption_dim is {config.caption_dim}: "
            f"encode prompts with the text encoder the model was trained with (hidden size {config.caption_dim}), or "
            f"build the model with GEARConfig(caption_dim={text_embeds.shape[-1]}, ...).")
    if text_embeds.shape[1] != config.text_length:
        raise ValueError(f"text_embeds have {text_embeds.shape[1]} positions but the model's text_length is "
                         f"{config.text_length}: pad / truncate the prompts to {config.text_length} tokens.")
    if text_attention_mask is not None and tuple(text_attention_mask.shape) != tuple(text_embeds.shape[:2]):
        raise ValueError(f"text_attention_mask must be (B, L) = {tuple(text_embeds.shape[:2])}, got "
                         f"{tuple(text_attention_mask.shape)}.")


@dataclass
class GEARCausalImageLMOutput(ModelOutput):
    """Output of [`GEARForCausalImageLM`].

    Args:
        loss: mean next-token cross-entropy, when `labels` were given.
        logits: `(B, S, vocab_size)` fp32 scores, one row per image token predicted in this call: `logits[:, t]` is
            the distribution of image token `n + t`, with `n` the image tokens already in the KV cache (0 when the
            call includes the prefix). A call with the prefix and T image tokens gives T + 1 rows, the first from
            the last prefix position (the class token, or text position `text_length - 1`); earlier prefix
            positions give none. `None` with `stop_at_layer`.
        cache: the [`GEARKVCache`] that was passed in, advanced past this call's positions (transformers >= 5.24
            names the cache `cache`; on 5.24 `output.past_key_values` still reads it, with a deprecation warning).
        hidden_states: with `output_hidden_states=True`, `(embeddings, after block 1, ..., after block n)`: entry 0
            is the input sequence of block 1, entry i the residual stream after block i, before the final norm
            (n = `stop_at_layer` or `num_hidden_layers`); rows aligned with `logits` (row t predicts image token
            n + t).
        last_hidden_state: residual stream after the last block that ran (block `stop_at_layer` or the final block),
            before the final norm, rows aligned with `logits`; always set. This is the REPA tap / truncated soft
            branch of GEAR.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: GEARKVCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    last_hidden_state: torch.FloatTensor | None = None


class GEARPreTrainedModel(PreTrainedModel):
    config: GEARConfig
    config_class = GEARConfig
    base_model_prefix = "gear"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GEARDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Linear / Embedding ~ N(0, initializer_range), norms = 1 (base class); the LM head starts at zero.
        super()._init_weights(module)
        if module is getattr(self, "output", None):
            init.zeros_(module.weight)


class GEARForCausalImageLM(GEARHubMixin, GEARPreTrainedModel, GenerationMixin):
    """LlamaGen over `[prefix] + image tokens` -> next image-token logits; the prefix is a class token
    (`config.condition_type="class"`) or projected text-encoder features (`"text"`).

    `forward(input_ids, class_labels)` / `forward(input_ids, text_embeds=..., text_attention_mask=...)` is the
    teacher-forced pass: with `input_ids` the first `L - 1` tokens of a `grid_size x grid_size` raster, `logits`
    holds the `L` next-token predictions. `input_probs` replaces `input_ids` by a distribution over the codebook
    (GEAR's soft read-out), `stop_at_layer` truncates the pass after a block. Images are sampled with
    [`generate_images`] (KV cache, classifier-free guidance).
    """

    def __init__(self, config: GEARConfig):
        super().__init__(config)
        self.cls_embedding = (GEARCaptionEmbedding(config) if config.is_text_conditional
                              else GEARClassEmbedding(config))
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.tok_dropout = nn.Dropout(config.token_dropout_prob)
        self.layers = nn.ModuleList(GEARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GEARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope_tables: dict[torch.device, torch.Tensor] = {}  # fp32, rebuilt per device, never saved
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    @property
    def max_sequence_length(self) -> int:
        """Prefix + every image token."""
        return self.config.prefix_length + self.config.num_image_tokens

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """fp32 2-D RoPE table for all `max_sequence_length` positions (a plain cached tensor, not a buffer)."""
        device = torch.device(device)
        if device not in self._rope_tables:
            c = self.config
            self._rope_tables[device] = build_2d_rope_table(c.grid_size, c.head_dim, c.rope_theta,
                                                            c.prefix_length).to(device)
        return self._rope_tables[device]

    def allocate_kv_cache(self, batch_size: int, max_length: int | None = None,
                          dtype: torch.dtype | None = None) -> GEARKVCache:
        """A static KV cache for `batch_size` rows and `max_length` positions (default: the full sequence)."""
        c = self.config
        return GEARKVCache(
            num_layers=c.num_hidden_layers, batch_size=batch_size, num_heads=c.num_attention_heads,
            head_dim=c.head_dim, max_length=max_length or self.max_sequence_length,
            dtype=dtype or self.tok_embeddings.weight.dtype, device=self.tok_embeddings.weight.device,
            with_key_mask=c.is_text_conditional,
        )

    @torch.no_grad()
    def init_text_stream_from_image(self) -> None:
        """Copy every text-stream block's image projections and norm into its text ones (`wqkv -> wqkv_text`,
        `wo -> wo_text`, `attention_norm -> attention_norm_text`): the official warm start of a text model from a
        class-conditional checkpoint."""
        for layer in self.layers:
            if layer.attention.has_text_stream:
                layer.attention.wqkv_text.weight.copy_(layer.attention.wqkv.weight)
                layer.attention.wo_text.weight.copy_(layer.attention.wo.weight)
                layer.attention_norm_text.weight.copy_(layer.attention_norm.weight)

    def check_class_labels(self, class_labels: torch.Tensor, *, allow_null: bool = True,
                           check_values: bool = True) -> None:
        check_class_labels(self.config, class_labels, allow_null=allow_null, check_values=check_values)

    def check_text_condition(self, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor | None) -> None:
        check_text_condition(self.config, text_embeds, text_attention_mask)

    def embed_image_tokens(self, input_ids: torch.Tensor | None = None, input_probs: torch.Tensor | None = None,
                           input_logits: torch.Tensor | None = None,
                           temperature: float | None = None) -> torch.Tensor:
        """Image-token embeddings from hard ids (`tok_embeddings(ids)`), soft `input_probs` (B, T, K)
        (`input_probs @ tok_embeddings.weight`) or assignment `input_logits` (B, T, K) with `temperature` τ
        (`softmax(logits / τ) @ tok_embeddings.weight`, memory-lean: `quantizers.soft_embed`)."""
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
                raise ValueError(f"input_ids must be an integer tensor (B, T), got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}; pass distributions as input_probs=(B, T, K).")
            return self.tok_embeddings(input_ids)
        soft, name = (input_probs, "input_probs") if input_probs is not None else (input_logits, "input_logits")
        if soft.dim() != 3 or soft.shape[-1] != self.config.vocab_size:
            raise ValueError(f"{name} must have shape (B, T, {self.config.vocab_size}), got {tuple(soft.shape)}.")
        if input_probs is not None:
            return input_probs @ self.tok_embeddings.weight
        if temperature is None:
            raise ValueError("input_logits need their temperature: pass temperature=τ (softmax(logits / τ)).")
        return soft_embed(input_logits, self.tok_embeddings.weight, temperature)

    def _embed_condition(self, class_labels, text_embeds, text_attention_mask, training: bool = False):
        """Prefix embeddings `(B, P, D)` and, for text, the key-validity mask of the text positions `(B, P)`."""
        if class_labels is not None:
            # Values are checked outside training only: a per-step host sync would stall the training loop
            # (the trainer checks the dataset's label range against num_classes once, at set-up).
            self.check_class_labels(class_labels, check_values=not training)
            return self.cls_embedding(class_labels), None
        self.check_text_condition(text_embeds, text_attention_mask)
        valid = (torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
                 if text_attention_mask is None else text_attention_mask.bool())
        return self.cls_embedding(text_embeds.to(self.cls_embedding.cap_proj.fc1.weight.dtype)), valid

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        *,
        text_embeds: torch.FloatTensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        input_probs: torch.FloatTensor | None = None,
        input_logits: torch.FloatTensor | None = None,
        temperature: float | None = None,
        labels: torch.LongTensor | None = None,
        cache: GEARKVCache | None = None,
        output_hidden_states: bool | None = None,
        stop_at_layer: int | None = None,
        return_dict: bool | None = None,
    ) -> GEARCausalImageLMOutput | tuple:
        r"""Run the transformer on `[prefix] + image tokens` (or on the next tokens of a cached sequence).

        Args:
            input_ids: `(B, T)` image-token ids in raster order (tokens `0..T-1`, or the next `T` tokens when a
                cache already holds the prefix and earlier tokens).
            class_labels: class-conditional models: `(B,)` labels in `[0, num_classes]` (`num_classes` = null
                class). In training mode each label is replaced by the null class with probability
                `config.class_dropout_prob`.
            text_embeds: text-conditional models: `(B, text_length, caption_dim)` text-encoder features
                (`last_hidden_state` of the prompts padded to `text_length`).
            text_attention_mask: `(B, text_length)`, 1 for real tokens and 0 for padding (default: all real).
                Padded positions are never attended, except by themselves; an all-padding caption (the official
                unconditional "" of Qwen3) gives the image no text at all.
            (The condition is required for an empty/absent cache and forbidden once the cache holds it.)
            input_probs: `(B, T, K)` distributions over the codebook instead of `input_ids` (soft read-out,
                embedded as `input_probs @ tok_embeddings.weight`).
            input_logits, temperature: `(B, T, K)` assignment logits A and τ instead: GEAR's soft read-out
                `softmax(A / τ) @ tok_embeddings.weight` without keeping any (B, T, K) tensor for the backward
                (`gear_hf.models.quantizers.soft_embed`). Give at most one of input_ids / input_probs /
                input_logits.
            labels: `(B, L)` target image tokens; `loss` is the mean cross-entropy of `logits[:, :L]` against them.
                With `input_ids = labels[:, :-1]` this is the next-token loss.
            cache: a [`GEARKVCache`] from `allocate_kv_cache`; updated in place and advanced. (`past_key_values=`
                is the pre-5.24 name, still accepted with a deprecation warning.)
            output_hidden_states: return the residual stream after every block that ran (see the output class).
            stop_at_layer: `n` in `[1, num_hidden_layers]`: run blocks `1..n` only and return their output in
                `last_hidden_state` (no later block, no final norm, no head; `logits` is None).
        """
        c = self.config
        tokens_given = sum(x is not None for x in (input_ids, input_probs, input_logits))
        if tokens_given > 1:
            raise ValueError("Pass one of input_ids (hard tokens), input_probs (soft distributions) or input_logits "
                             "(assignment logits with temperature), not several.")
        if class_labels is not None and text_embeds is not None:
            raise ValueError("Pass either class_labels or text_embeds, not both.")
        if stop_at_layer is not None and not 1 <= stop_at_layer <= c.num_hidden_layers:
            raise ValueError(f"stop_at_layer must be in [1, {c.num_hidden_layers}] (1-based block index), "
                             f"got {stop_at_layer}.")
        past = cache.seq_length if cache is not None else 0
        conditioned = class_labels is not None or text_embeds is not None
        condition_name = "text_embeds" if c.is_text_conditional else "class_labels"
        if not conditioned and past == 0:
            raise ValueError(f"{condition_name} are required unless the cache already holds the condition.")
        if conditioned and past > 0:
            raise ValueError(f"{condition_name} were given but the KV cache already holds {past} positions; pass only "
                             "the next image tokens.")
        if not conditioned and not tokens_given:
            raise ValueError("Nothing to run: pass input_ids, input_probs or input_logits.")
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict

        # 1. Embed [prefix] + image tokens, then token dropout over the whole sequence.
        pieces, text_valid = [], None
        if conditioned:
            # GEAR's soft pass (soft input, autograd on) runs in eval mode but is training: no label-value check.
            soft_training = (input_probs is not None or input_logits is not None) and torch.is_grad_enabled()
            prefix, text_valid = self._embed_condition(class_labels, text_embeds, text_attention_mask,
                                                       training=self.training or soft_training)
            pieces.append(prefix)
        if tokens_given:
            pieces.append(self.embed_image_tokens(input_ids, input_probs, input_logits, temperature))
        hidden_states = self.tok_dropout(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])

        # 2. Rotary rows and (text models) the attention mask of the positions covered by this call.
        batch, length = hidden_states.shape[:2]
        if past + length > self.max_sequence_length:
            raise ValueError(f"Sequence of {past + length} positions exceeds the model's {self.max_sequence_length} "
                             f"({c.prefix_length} prefix + {c.grid_size}x{c.grid_size} image tokens).")
        rope_table = self.rope_table(hidden_states.device)[past : past + length]
        attention_mask, num_text = None, 0
        if c.is_text_conditional:
            num_text = max(0, min(length, c.text_length - past))
            attention_mask = self._text_attention_mask(text_valid, cache, past, length, batch)

        # 3. Blocks (optionally truncated).
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers[: stop_at_layer or c.num_hidden_layers]:
            hidden_states = layer(hidden_states, rope_table, cache=cache, attention_mask=attention_mask,
                                  num_text=num_text)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.advance(length)

        # 4. Rows that predict image tokens (from the last prefix position on), then the head.
        first = max(0, c.prefix_length - 1 - past)
        if first:
            hidden_states = hidden_states[:, first:]
            all_hidden_states = all_hidden_states and tuple(h[:, first:] for h in all_hidden_states)
        logits = loss = None
        if stop_at_layer is None:
            logits = self.output(self.norm(hidden_states)).float()
            if labels is not None:
                if labels.shape[1] > logits.shape[1]:
                    raise ValueError(f"labels cover {labels.shape[1]} positions but only {logits.shape[1]} logits "
                                     "were computed; pass input_ids = labels[:, :-1].")
                loss = F.cross_entropy(logits[:, : labels.shape[1]].flatten(0, 1), labels.flatten())

        output = GEARCausalImageLMOutput(loss=loss, logits=logits, cache=cache,
                                         hidden_states=all_hidden_states, last_hidden_state=hidden_states)
        return output if return_dict else output.to_tuple()

    def _text_attention_mask(self, text_valid, cache, past: int, length: int, batch: int) -> torch.Tensor:
        """The boolean mask of a text model's call; the cache remembers which text positions are padding."""
        c = self.config
        if cache is None:
            image = torch.ones(batch, past + length - text_valid.shape[1], dtype=torch.bool, device=text_valid.device)
            key_valid = torch.cat([text_valid, image], dim=1)
        else:
            if text_valid is not None:
                cache.key_mask[:batch, : text_valid.shape[1]] = text_valid
            key_valid = cache.key_mask[:batch, : past + length]
            if length == 1 and past >= c.text_length:  # decode step: every valid key is earlier (no alloc)
                return key_valid[:, None, None, :]
        return text_attention_mask_for(key_valid, past, length, c.text_length, c.text_attention)

    def decode_step(self, input_ids: torch.LongTensor, cache: GEARKVCache, position: torch.LongTensor) -> torch.Tensor:
        """One image token per row `(R, 1)` at sequence `position` (a `(1,)` LongTensor; the prefix counts) into a
        filled cache -> next-token logits `(R, vocab_size)` fp32: the eager cached step with static shapes (the
        `torch.compile` target of sampling). Keys/values go in with `index_copy_`, the rotary row is picked by index
        and attention spans the whole cache under `cache.step_mask`, so no Python int changes between steps."""
        hidden_states = self.tok_dropout(self.tok_embeddings(input_ids))
        rope_table = self.rope_table(input_ids.device).index_select(0, position)
        mask = cache.step_mask(position)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rope_table, cache=cache, attention_mask=mask, position=position)
        return self.output(self.norm(hidden_states[:, -1])).float()

    def generate_images(self, class_labels: torch.LongTensor | None = None, **sampling_kwargs) -> torch.LongTensor:
        """Sample `(B, grid_size, grid_size)` image-token grids for class labels or text embeddings; see
        `gear_hf.sampling.generate_image_tokens`."""
        return generate_image_tokens(self, class_labels, **sampling_kwargs)

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "GEARForCausalImageLM samples image tokens with model.generate_images(class_labels | text_embeds=..., "
            "guidance_scale=..., ...) (static KV cache, classifier-free guidance); the text-oriented generate() is "
            "not supported."
        )


__all__ = [
    "GEARRMSNorm",
    "GEARSwiGLU",
    "GEARKVCache",
    "GEARAttention",
    "GEARDecoderLayer",
    "GEARClassEmbedding",
    "GEARCaptionEmbedding",
    "GEARCaptionProjection",
    "GEARCausalImageLMOutput",
    "GEARPreTrainedModel",
    "GEARForCausalImageLM",
    "build_2d_rope_table",
    "apply_2d_rope",
    "by_stream",
    "text_attention_mask_for",
]
