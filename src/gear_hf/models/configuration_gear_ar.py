"""Configuration of GEAR's LlamaGen autoregressive generator, class-conditional or text-conditional."""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedConfig

# Architecture presets of the LlamaGen family (names as in GEAR; LlamaGen calls them GPT-*). Every preset uses
# head_dim 64 except LlamaGen-S (32) and LlamaGen-1B (72). LlamaGen-1B is GEAR's text-to-image size (Table 17; not
# LlamaGen's GPT-1B, which was 22 x 32 x 2048).
LLAMAGEN_PRESETS: dict[str, dict[str, int]] = {
    "LlamaGen-S": {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 384},
    "LlamaGen-B": {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768},
    "LlamaGen-L": {"num_hidden_layers": 24, "num_attention_heads": 16, "hidden_size": 1024},
    "LlamaGen-XL": {"num_hidden_layers": 36, "num_attention_heads": 20, "hidden_size": 1280},
    "LlamaGen-1B": {"num_hidden_layers": 36, "num_attention_heads": 20, "hidden_size": 1440},
    "LlamaGen-XXL": {"num_hidden_layers": 48, "num_attention_heads": 24, "hidden_size": 1536},
    "LlamaGen-XXXL": {"num_hidden_layers": 48, "num_attention_heads": 40, "hidden_size": 2560},
}


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of `k` that is >= `n`."""
    return n if n % k == 0 else n + k - n % k


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width of LlamaGen: 2/3 of 4*hidden, rounded up to a multiple of 256."""
    return find_multiple(int(2 * 4 * hidden_size / 3), 256)


CONDITION_TYPES = ("class", "text")
TEXT_ATTENTION_MODES = ("causal", "prefix")


class GEARConfig(PreTrainedConfig):
    r"""Configuration of [`GEARForCausalImageLM`], GEAR's LlamaGen transformer.

    The model predicts the `grid_size**2` image tokens of a VQ tokenizer in raster order, conditioned on a prefix:
    one class token (`condition_type="class"`), or `text_length` projected text-encoder features
    (`condition_type="text"`, GEAR's text-to-image model). Build a named size with
    `GEARConfig.from_preset("LlamaGen-B", **overrides)` or give the sizes directly.

    Args:
        condition_type: `"class"` (class-conditional) or `"text"` (text-conditional).
        vocab_size: codebook size K of the image tokenizer (number of image-token ids).
        num_classes: number of real classes. The null (unconditional) class has index `num_classes`; its
            embedding row exists only when `class_dropout_prob > 0` (the table then has `num_classes + 1` rows).
        hidden_size, num_hidden_layers, num_attention_heads: transformer sizes (no grouped-query attention).
        intermediate_size: SwiGLU width; `None` picks LlamaGen's `find_multiple(int(8 * hidden_size / 3), 256)`.
        rms_norm_eps: epsilon of the RMSNorms.
        rope_theta: base of the 2-D rotary embedding.
        image_size: image side in pixels; with `downsample_factor` it sets the token grid.
        downsample_factor: tokenizer stride; `grid_size = image_size // downsample_factor` tokens per side.
        class_dropout_prob: probability of replacing a label by the null class during training (for CFG).
        token_dropout_prob: dropout on the input embedding sequence (class token included) during training.
        resid_dropout_prob: dropout on the attention output projection.
        ffn_dropout_prob: dropout on the SwiGLU output.
        attn_dropout_prob: dropout on the attention probabilities.
        initializer_range: std of the normal init of linear and embedding weights.
        cls_token_num: number of prefix positions of the class-conditional model: exactly one.
        caption_dim: text only: hidden size of the text encoder (2048 for Qwen3-1.7B); the caption projector maps
            it to `hidden_size`.
        text_length: text only: number of text positions (captions are padded / truncated to it; official 300).
        text_attention: text only: `"causal"` (official default: text position i sees valid text positions <= i)
            or `"prefix"` (text positions see every valid text position). Image positions always see every valid
            text position and the earlier image tokens; padded text positions are never attended, except by
            themselves.
        num_double_stream_layers: text only: the first blocks give text positions their own attention
            projections and norm (`wqkv_text`, `wo_text`, `attention_norm_text`; one joint attention); the rest are
            plain blocks over the whole sequence. `None` = official `max(1, round(num_hidden_layers / 3))`.
    """

    model_type = "gear_ar"
    presets: ClassVar[dict[str, dict[str, int]]] = LLAMAGEN_PRESETS

    condition_type: str = "class"
    vocab_size: int = 16384
    num_classes: int = 1000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    image_size: int = 256
    downsample_factor: int = 16
    class_dropout_prob: float = 0.1
    token_dropout_prob: float = 0.1
    resid_dropout_prob: float = 0.1
    ffn_dropout_prob: float = 0.1
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    cls_token_num: int = 1
    caption_dim: int = 2048
    text_length: int = 300
    text_attention: str = "causal"
    num_double_stream_layers: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.num_double_stream_layers is None:
            self.num_double_stream_layers = (max(1, round(self.num_hidden_layers / 3))
                                             if self.condition_type == "text" else 0)
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        if self.condition_type not in CONDITION_TYPES:
            raise ValueError(f"GEARConfig.condition_type must be one of {CONDITION_TYPES}, got "
                             f"{self.condition_type!r}.")
        if self.condition_type == "text":
            self._validate_text()
        elif self.num_double_stream_layers != 0:
            raise ValueError("num_double_stream_layers applies to text-conditional models only "
                             "(condition_type='text'); a class-conditional model has none.")
        for name in ("vocab_size", "num_classes", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "image_size", "downsample_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GEARConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}). LlamaGen presets use a head dimension of 64 (32 for LlamaGen-S)."
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"The head dimension hidden_size / num_attention_heads = {self.head_dim} must be a multiple of 4: "
                "the 2-D rotary embedding rotates pairs of channels, half of them by row and half by column."
            )
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by downsample_factor ({self.downsample_factor})."
            )
        if self.cls_token_num != 1:
            raise ValueError(
                f"cls_token_num={self.cls_token_num} is not supported: the class-conditional model uses exactly one "
                "class token (cls_token_num=1)."
            )
        for name in ("class_dropout_prob", "token_dropout_prob", "resid_dropout_prob", "ffn_dropout_prob",
                     "attn_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GEARConfig.{name} must be in [0, 1), got {value!r}.")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0 or self.initializer_range < 0:
            raise ValueError(
                "rms_norm_eps and rope_theta must be > 0 and initializer_range >= 0, got "
                f"{self.rms_norm_eps}, {self.rope_theta}, {self.initializer_range}."
            )

    def _validate_text(self) -> None:
        for name in ("caption_dim", "text_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GEARConfig.{name} must be a positive integer, got {value!r}.")
        if self.text_attention not in TEXT_ATTENTION_MODES:
            raise ValueError(f"GEARConfig.text_attention must be one of {TEXT_ATTENTION_MODES}, got "
                             f"{self.text_attention!r}.")
        n = self.num_double_stream_layers
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.num_hidden_layers:
            raise ValueError(f"num_double_stream_layers must be an int in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}] (None = max(1, round(num_hidden_layers / 3))), got {n!r}.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GEARConfig:
        """Config of a named LlamaGen size (`LlamaGen-S/B/L/XL/XXL/XXXL`); keyword overrides win."""
        if name not in cls.presets:
            raise ValueError(f"Unknown LlamaGen preset {name!r}; choose one of {sorted(cls.presets)}.")
        return cls(**{**cls.presets[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Image tokens per side."""
        return self.image_size // self.downsample_factor

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def is_text_conditional(self) -> bool:
        return self.condition_type == "text"

    @property
    def prefix_length(self) -> int:
        """Condition positions before the image tokens: 1 class token, or `text_length` text positions."""
        return self.text_length if self.is_text_conditional else self.cls_token_num

    @property
    def null_class_id(self) -> int:
        """Label of the unconditional (CFG) class; only embeddable when `class_dropout_prob > 0`."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def num_class_embeddings(self) -> int:
        return self.num_classes + int(self.has_null_class)


__all__ = ["GEARConfig", "LLAMAGEN_PRESETS", "CONDITION_TYPES", "TEXT_ATTENTION_MODES", "find_multiple",
           "default_intermediate_size"]
