"""Reading official GEAR / LlamaGen / Open-MAGVIT2 / IBQ checkpoint files.

This module holds the layout-independent pieces: loading a file safely, stripping wrapper prefixes and
strict key checking. Model-specific selection (which sub-dict of a training checkpoint holds the weights)
lives next to it in `select_*_state_dict` functions.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping

import torch

from .models.configuration_gear_ar import LLAMAGEN_PRESETS, GEARConfig
from .models.modeling_gear_ar import GEARForCausalImageLM
from .models.modeling_gear_tokenizer import GEARTokenizerModel

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (missing/unexpected keys or wrong shapes)."""


def load_checkpoint_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Mapping:
    """Load a `.pt`/`.ckpt`/`.bin`/`.safetensors` file onto the CPU.

    Pickled files are read with `torch.load(weights_only=True)`, which only accepts tensors and plain
    containers. Files that pickle other objects (e.g. Lightning hyper-parameters) need `allow_pickle=True`,
    which runs arbitrary code from the file: only use it for files you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise pickle.UnpicklingError(
                f"{path} stores Python objects besides tensors, so it cannot be read with weights_only=True. "
                "If you trust this file, pass allow_pickle=True (CLI: --allow-pickle) to unpickle it fully."
            ) from err
    logger.warning("Unpickling %s with weights_only=False (allow_pickle=True): the file is trusted.", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, in any order/repetition."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def check_state_dict(
    model_state: Mapping[str, torch.Tensor],
    checkpoint_state: Mapping[str, torch.Tensor],
    *,
    ignorable: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Strictly compare a checkpoint with a model's state dict.

    Returns the checkpoint without the `ignorable` keys. Raises `CheckpointMismatchError` listing every
    missing key, unexpected key and shape mismatch, so a wrong file never loads silently.
    """
    ignorable = set(ignorable)
    found = {k: v for k, v in checkpoint_state.items() if k not in ignorable}
    missing = sorted(set(model_state) - set(found))
    unexpected = sorted(set(found) - set(model_state))
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in set(found) & set(model_state)
        if tuple(found[k].shape) != tuple(model_state[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"The {what} does not match the model."]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
        lines.append("Check that the config (quantizer, sizes, codebook size) matches the checkpoint.")
        raise CheckpointMismatchError("\n".join(lines))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers (VQ-16 / LFQ-16 / IBQ-16)
# ---------------------------------------------------------------------------------------------------------------

TOKENIZER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# LlamaGen registers a persistent codebook-usage buffer that GEAR's VQ-16 dropped.
TOKENIZER_IGNORABLE_KEYS = ("quantize.codebook_used",)
_EMA_PREFIX = "model_ema."
_TOKENIZER_FAMILY_NAMES = {"vq": "VQ (LlamaGen VQGAN)", "lfq": "LFQ (Open-MAGVIT2)", "ibq": "IBQ"}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _lightning_tokenizer_state_dict(inner: Mapping, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Tokenizer tensors of a Lightning `state_dict`, replaced by their `model_ema.` shadows where present.

    LitEma names a shadow `model_ema.` + the parameter name with every dot removed. Training-only entries
    (`loss.*`, EMA bookkeeping, ...) are dropped.
    """
    inner = strip_wrapper_prefixes({k: v for k, v in inner.items() if torch.is_tensor(v)})
    live = {k: v for k, v in inner.items() if k.startswith(TOKENIZER_PREFIXES)}
    shadows = {k[len(_EMA_PREFIX) :]: v for k, v in inner.items() if k.startswith(_EMA_PREFIX)}
    from_ema = 0
    for key in live:
        shadow = shadows.get(key.replace(".", ""))
        if shadow is not None:
            live[key] = shadow
            from_ema += 1
    dropped = sorted({k.split(".")[0] for k in inner if not k.startswith(TOKENIZER_PREFIXES + (_EMA_PREFIX,))})
    if shadows:
        source = f"EMA weights (model_ema.*) for {from_ema} of {len(live)} tensors, live weights for the rest"
    else:
        source = f"live weights for all {len(live)} tensors (the file has no model_ema.* shadows)"
    description = f"Lightning checkpoint ['state_dict']: {source}"
    if from_ema and not use_ema:
        description += " (use_ema=False does not apply here: like the official loader, Lightning EMA shadows win)"
    if dropped:
        description += f"; ignored training-only entries: {', '.join(dropped)}"
    return live, description


def select_tokenizer_state_dict(raw: Mapping, *, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the tokenizer weights out of an official checkpoint dictionary.

    Accepted layouts (checked in this order, like the official loader):

    * Lightning (Open-MAGVIT2 / IBQ releases): `{'state_dict': {...}}`. Keys under `encoder. decoder.
      quant_conv. post_quant_conv. quantize.` are kept; `model_ema.<key without dots>` shadows replace them
      when present (always, as in the official loader, whatever `use_ema` says).
    * GEAR Stage-0/1 training checkpoints: `{'vq': sd, 'vq_ema': sd, ...}`. `use_ema=True` selects `vq_ema`
      (falling back to `vq` when absent), `use_ema=False` selects `vq`.
    * LlamaGen: `{'model': sd}`.
    * A bare state dict.

    Leading `_orig_mod.` / `module.` prefixes are removed. Returns `(state_dict, description)`, where the
    description says which weights were used (log or print it: the two EMA choices give different models).
    """
    if not isinstance(raw, Mapping):
        raise CheckpointMismatchError(f"Expected a checkpoint dictionary, got {type(raw).__name__}.")
    if isinstance(raw.get("state_dict"), Mapping):
        state, description = _lightning_tokenizer_state_dict(raw["state_dict"], use_ema)
    elif "vq" in raw or "vq_ema" in raw:
        has_live, has_ema = isinstance(raw.get("vq"), Mapping), isinstance(raw.get("vq_ema"), Mapping)
        if use_ema and has_ema:
            key, note = "vq_ema", "EMA weights"
        elif has_live:
            key = "vq"
            if use_ema:
                note = "live weights; EMA requested but the file has no 'vq_ema'"
            else:
                note = "live weights" + ("; the file also has EMA weights 'vq_ema' (use_ema=True / --ema)" if has_ema else "")
        else:
            raise CheckpointMismatchError(
                "This GEAR checkpoint only has EMA tokenizer weights ('vq_ema'); pass use_ema=True (CLI: --ema)."
            )
        state, description = raw[key], f"GEAR training checkpoint: using '{key}' ({note})"
    elif isinstance(raw.get("model"), Mapping):
        state, description = raw["model"], "LlamaGen checkpoint: using 'model'"
    else:
        state, description = raw, "bare state dict"
    if not _is_state_dict(state):
        keys = ", ".join(sorted(map(str, raw))[:20])
        raise CheckpointMismatchError(
            f"No tokenizer weights found in this checkpoint (top-level keys: {keys}). Expected a state dict, "
            "{'state_dict': ...} (Lightning), {'vq': ..., 'vq_ema': ...} (GEAR Stage 0/1) or {'model': ...} "
            "(LlamaGen). Stage-2 checkpoints ('ar', 'ema') hold no tokenizer: convert the tokenizer file instead."
        )
    return strip_wrapper_prefixes(state), description


def infer_tokenizer_family(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """(quantizer, codebook_size) an official tokenizer state dict was made for; `None` where unrecognisable."""
    if any(k.startswith(("encoder.mid_block.", "decoder.adaptive.")) for k in state_dict):
        conv_out = state_dict.get("encoder.conv_out.weight")
        return "lfq", (2 ** conv_out.shape[0] if conv_out is not None else None)
    embedding = state_dict.get("quantize.embedding.weight")
    size = embedding.shape[0] if embedding is not None else None
    if any(k.startswith("encoder.conv_blocks.") for k in state_dict):
        return "vq", size
    if any(k.startswith("encoder.down.") for k in state_dict):
        return "ibq", size
    return None, size


def load_tokenizer_from_official_checkpoint(
    path: str | os.PathLike,
    config,
    *,
    use_ema: bool = False,
    allow_pickle: bool = False,
    model_class=None,
):
    """Build a `GEARTokenizerModel` for `config` from an official checkpoint file and load it strictly.

    Returns `(model, description)`; the model is in eval mode and `description` says which weights were used.
    Raises `CheckpointMismatchError` when the file holds another quantizer family or codebook size than
    `config`, or when any key is missing/unexpected (LlamaGen's `quantize.codebook_used` is ignored) or has
    another shape.
    """
    model_class = model_class or GEARTokenizerModel
    raw = load_checkpoint_file(path, allow_pickle=allow_pickle)
    state, description = select_tokenizer_state_dict(raw, use_ema=use_ema)
    family, codebook_size = infer_tokenizer_family(state)
    if family is not None and family != config.quantizer:
        raise CheckpointMismatchError(
            f"{os.fspath(path)} holds a {_TOKENIZER_FAMILY_NAMES[family]} tokenizer, but config.quantizer="
            f"{config.quantizer!r}. Use quantizer={family!r} (e.g. GEARTokenizerConfig.from_preset("
            f"'{family.upper()}-16'); CLI: --quantizer {family})."
        )
    if codebook_size is not None and codebook_size != config.codebook_size:
        raise CheckpointMismatchError(
            f"{os.fspath(path)} has a codebook of {codebook_size} codes, but config.codebook_size="
            f"{config.codebook_size}. Build the config with codebook_size={codebook_size}."
        )
    model = model_class(config)
    state = check_state_dict(
        model.state_dict(), state, ignorable=TOKENIZER_IGNORABLE_KEYS, what=f"tokenizer checkpoint {os.fspath(path)}"
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    logger.info("Loaded %s tokenizer from %s: %s", config.quantizer.upper(), os.fspath(path), description)
    return model, description


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional AR generator (GEAR / LlamaGen c2i)
# ---------------------------------------------------------------------------------------------------------------

AR_PREFIXES = ("cls_embedding.", "tok_embeddings.", "layers.", "norm.", "output.")


def _drop_ar_sampling_buffers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove KV-cache buffers (`layers.{i}.attention.kv_cache.*`, `causal_mask`) that LlamaGen-style models
    carry only while sampling; they are never weights."""
    kept, dropped = {}, []
    for key, value in state.items():
        if ".kv_cache." in key or key in ("causal_mask", "freqs_cis"):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def select_ar_state_dict(raw: Mapping, *, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the AR generator weights out of an official checkpoint dictionary.

    Accepted layouts (same precedence as the official `src/inference.py`):

    * GEAR Stage-1/2 checkpoints `{'ar': sd, 'ema': sd, ...}`: `use_ema=True` takes `ema` (falls back to `ar`),
      `use_ema=False` takes `ar` (falls back to `ema` when the file has only EMA weights).
    * LlamaGen checkpoints `{'model': sd, ...}`.
    * A bare state dict.

    Leading `_orig_mod.` / `module.` prefixes and sampling-only KV-cache buffers are removed. Returns
    `(state_dict, description)`; the description says which weights were used.
    """
    if not isinstance(raw, Mapping):
        raise CheckpointMismatchError(f"Expected a checkpoint dictionary, got {type(raw).__name__}.")
    has_live, has_ema = isinstance(raw.get("ar"), Mapping), isinstance(raw.get("ema"), Mapping)
    if has_live or has_ema:
        if (use_ema and has_ema) or not has_live:
            state = raw["ema"]
            description = "GEAR checkpoint ['ema']: EMA weights"
            if not use_ema:
                description += " (use_ema=False, but the file has no live 'ar' weights)"
        else:
            state = raw["ar"]
            description = "GEAR checkpoint ['ar']: live (non-EMA) weights"
            if use_ema:
                description += " (use_ema=True, but the file has no 'ema' weights)"
    elif isinstance(raw.get("model"), Mapping):
        state, description = raw["model"], "LlamaGen checkpoint ['model']"
    elif _is_state_dict(raw):
        state, description = raw, "bare state dict"
    else:
        raise CheckpointMismatchError(
            "Unrecognised AR checkpoint layout: expected 'ar'/'ema' (GEAR), 'model' (LlamaGen) or a bare state "
            f"dict; top-level keys are {sorted(map(str, raw))[:20]}. Tokenizer files ('vq', 'state_dict') hold no AR."
        )
    state = strip_wrapper_prefixes({k: v for k, v in state.items() if torch.is_tensor(v)})
    state, dropped = _drop_ar_sampling_buffers(state)
    if dropped:
        description += f"; dropped {len(dropped)} sampling-only buffers (KV cache)"
    return state, description


# The condition module tells the two AR kinds apart: a caption projection (text) or a class table (class).
CAPTION_PROJECTION_KEY = "cls_embedding.cap_proj.fc1.weight"
CLASS_TABLE_KEY = "cls_embedding.embedding_table.weight"


def infer_ar_config_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """Sizes readable from an AR state dict's shapes: vocab, hidden, layers, FFN width, and the condition:
    classes (class-conditional) or caption_dim and the number of dual-stream blocks (text-conditional).

    The class table is assumed to carry the null-class row (`num_classes + 1` rows, as in every GEAR/LlamaGen
    c2i checkpoint trained with class dropout). The head count is not recoverable from shapes.
    """
    text = CAPTION_PROJECTION_KEY in state_dict
    condition_key = CAPTION_PROJECTION_KEY if text else CLASS_TABLE_KEY
    required = ("tok_embeddings.weight", condition_key, "layers.0.feed_forward.w1.weight",
                "layers.0.attention.wqkv.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise CheckpointMismatchError(f"Not a LlamaGen/GEAR AR state dict: missing {absent}.")
    vocab_size, hidden_size = state_dict["tok_embeddings.weight"].shape
    wqkv = state_dict["layers.0.attention.wqkv.weight"]
    if tuple(wqkv.shape) != (3 * hidden_size, hidden_size):
        raise CheckpointMismatchError(
            f"layers.0.attention.wqkv.weight has shape {tuple(wqkv.shape)}, expected {(3 * hidden_size, hidden_size)}"
            " (grouped-query attention is not supported)."
        )
    layer_ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    sizes: dict[str, int | str] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_hidden_layers": max(layer_ids) + 1,
        "intermediate_size": int(state_dict["layers.0.feed_forward.w1.weight"].shape[0]),
    }
    if text:
        sizes["condition_type"] = "text"
        sizes["caption_dim"] = int(state_dict[condition_key].shape[1])
        sizes["num_double_stream_layers"] = len({int(k.split(".")[1]) for k in state_dict
                                                 if k.endswith("attention.wqkv_text.weight")})
    else:
        sizes["num_classes"] = int(state_dict[condition_key].shape[0]) - 1
    return sizes


def ar_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    image_size: int,
    downsample_factor: int = 16,
    preset: str | None = None,
    num_attention_heads: int | None = None,
    **config_overrides,
):
    """`GEARConfig` for an AR state dict: sizes from the shapes, the rest (grid, heads) from the caller.

    Give `preset` (e.g. `"LlamaGen-B"`; its sizes must match the weights) or `num_attention_heads`.
    """
    sizes = infer_ar_config_kwargs(state_dict)
    if preset is not None:
        if preset not in LLAMAGEN_PRESETS:
            raise ValueError(f"Unknown AR preset {preset!r}; choose one of {sorted(LLAMAGEN_PRESETS)}.")
        expected = LLAMAGEN_PRESETS[preset]
        clash = {k: (v, sizes[k]) for k, v in expected.items() if k in sizes and sizes[k] != v}
        if clash:
            found = ", ".join(f"{k}={got} (preset {want})" for k, (want, got) in clash.items())
            raise CheckpointMismatchError(f"The checkpoint is not {preset}: it has {found}.")
        if num_attention_heads is not None and num_attention_heads != expected["num_attention_heads"]:
            raise ValueError(f"num_attention_heads={num_attention_heads} contradicts preset {preset} "
                             f"({expected['num_attention_heads']} heads); give only one of them.")
        num_attention_heads = expected["num_attention_heads"]
    if num_attention_heads is None:
        raise ValueError(
            "The number of attention heads cannot be read from the weights: pass preset='LlamaGen-B' (etc.) or "
            f"num_attention_heads (hidden size {sizes['hidden_size']}; LlamaGen uses head_dim 64, i.e. "
            f"{max(sizes['hidden_size'] // 64, 1)} heads, except LlamaGen-S with 12)."
        )
    # Overrides win (e.g. num_classes + class_dropout_prob=0 for a table without null row); the strict load
    # then catches any size that contradicts the weights.
    return GEARConfig(**{**sizes, **config_overrides}, num_attention_heads=num_attention_heads,
                      image_size=image_size, downsample_factor=downsample_factor)


def _read_ar_checkpoint(path_or_checkpoint: str | os.PathLike | Mapping, allow_pickle: bool) -> tuple[Mapping, str]:
    """(the checkpoint dictionary, how to name it in messages)."""
    if isinstance(path_or_checkpoint, Mapping):
        return path_or_checkpoint, "AR checkpoint"
    return (load_checkpoint_file(path_or_checkpoint, allow_pickle=allow_pickle),
            f"AR checkpoint {os.fspath(path_or_checkpoint)}")


def load_ar_from_official_checkpoint(
    path_or_checkpoint: str | os.PathLike | Mapping,
    *,
    image_size: int,
    downsample_factor: int = 16,
    preset: str | None = None,
    num_attention_heads: int | None = None,
    use_ema: bool = True,
    allow_pickle: bool = False,
    **config_overrides,
):
    """Build a `GEARForCausalImageLM` from an official GEAR/LlamaGen AR checkpoint (file or loaded dict).

    Sizes come from the weights (`infer_ar_config_kwargs`), `image_size`/`downsample_factor` and the head count
    (`preset` or `num_attention_heads`) from the caller. `use_ema=True` (the official inference default) prefers
    the EMA weights. Loading is strict: any missing/unexpected key or shape mismatch raises
    `CheckpointMismatchError` listing them. Returns `(model, description)` with the model in eval mode.
    """
    raw, where = _read_ar_checkpoint(path_or_checkpoint, allow_pickle)
    state, description = select_ar_state_dict(raw, use_ema=use_ema)
    if CAPTION_PROJECTION_KEY in state:
        raise CheckpointMismatchError(f"The {where} is a text-to-image model (caption projection): load it with "
                                      "load_t2i_from_official_checkpoint (CLI: convert_checkpoint.py t2i).")
    config = ar_config_from_state_dict(state, image_size=image_size, downsample_factor=downsample_factor,
                                       preset=preset, num_attention_heads=num_attention_heads, **config_overrides)
    model = GEARForCausalImageLM(config)
    state = check_state_dict(model.state_dict(), state, what=where)
    model.load_state_dict(state, strict=True)
    model.eval()
    logger.info("Loaded AR generator from %s: %s", where, description)
    return model, description


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image AR (models/llamagen_t2i.py)
# ---------------------------------------------------------------------------------------------------------------

T2I_DEFAULTS = {"text_length": 300, "text_attention": "causal"}  # official --text-max-len / --text-attn
_T2I_ARGS_KEYS = {"text_length": ("cls_token_num", "text_max_len"), "text_attention": ("text_attn",)}


def t2i_settings(raw: Mapping, *, text_length: int | None = None, text_attention: str | None = None
                 ) -> tuple[dict[str, int | str], str]:
    """Text length and attention mode of a t2i checkpoint: its saved training `args` when present, else the given
    values, else the official defaults (300 / "causal"). A given value that contradicts the saved `args` is an
    error. Returns `(settings, description)`."""
    saved_args = raw.get("args") if isinstance(raw, Mapping) else None
    saved_args = saved_args if isinstance(saved_args, Mapping) else {}
    given = {"text_length": text_length, "text_attention": text_attention}
    settings, sources = {}, []
    for name, keys in _T2I_ARGS_KEYS.items():
        saved = next((saved_args[k] for k in keys if saved_args.get(k) is not None), None)
        if saved is not None and given[name] is not None and given[name] != saved:
            raise ValueError(f"{name}={given[name]!r} contradicts the checkpoint's saved args ({keys[0]}={saved!r}); "
                             "drop the flag, or pass the value the model was trained with.")
        if saved is not None:
            settings[name], source = saved, "checkpoint args"
        elif given[name] is not None:
            settings[name], source = given[name], "given"
        else:
            settings[name], source = T2I_DEFAULTS[name], "official default"
        sources.append(f"{name}={settings[name]!r} ({source})")
    return settings, ", ".join(sources)


_TEXT_STREAM_MODULES = ("wqkv_text", "wo_text", "attention_norm_text")


def _is_new_in_text_warm_start(key: str) -> bool:
    return key.startswith("cls_embedding.") or any(f".{name}." in key for name in _TEXT_STREAM_MODULES)


def load_t2i_from_official_checkpoint(
    path_or_checkpoint: str | os.PathLike | Mapping,
    *,
    image_size: int,
    downsample_factor: int = 16,
    preset: str | None = None,
    num_attention_heads: int | None = None,
    text_length: int | None = None,
    text_attention: str | None = None,
    use_ema: bool = True,
    allow_pickle: bool = False,
    init_text_stream_from_class: bool = False,
    caption_dim: int | None = None,
):
    """Build a text-conditional `GEARForCausalImageLM` from an official GEAR t2i checkpoint (file or loaded dict).

    Sizes (hidden, layers, FFN, vocab, caption_dim, dual-stream blocks) come from the weights; text length and
    attention mode from `t2i_settings`; the head count from `preset` or `num_attention_heads`. Loading is strict.

    `init_text_stream_from_class=True` instead starts a NEW text model from a class-conditional checkpoint, as the
    official `--ar-init-ckpt` + `--text-stream-copy-init`: the image stream loads strictly, the text-stream
    projections and norms are copied from it (`init_text_stream_from_image`), the caption projection is freshly
    initialised (`caption_dim` is then required: the text encoder's hidden size). Returns `(model, description)`.
    """
    raw, where = _read_ar_checkpoint(path_or_checkpoint, allow_pickle)
    state, description = select_ar_state_dict(raw, use_ema=use_ema)
    settings, settings_note = t2i_settings(raw, text_length=text_length, text_attention=text_attention)
    saved_args = raw.get("args") if isinstance(raw.get("args"), Mapping) else {}
    if preset is None and num_attention_heads is None and saved_args.get("ar_model") in LLAMAGEN_PRESETS:
        preset = saved_args["ar_model"]  # the size name the checkpoint was trained with
    is_class = CLASS_TABLE_KEY in state and CAPTION_PROJECTION_KEY not in state
    if is_class and not init_text_stream_from_class:
        raise CheckpointMismatchError(
            f"The {where} is class-conditional (cls_embedding.embedding_table, no caption projection). To start a "
            "text-to-image model from it, ask for it: init_text_stream_from_class=True with caption_dim=<text "
            "encoder hidden size> (CLI: --init-text-stream-from-class-conditional --caption-dim N); to convert it "
            "as it is, use the class-conditional converter (convert_checkpoint.py ar).")
    if init_text_stream_from_class and not is_class:
        raise CheckpointMismatchError(f"init_text_stream_from_class=True needs a class-conditional checkpoint, but the "
                                      f"{where} is already text-conditional: convert it without that option.")
    if is_class:
        if caption_dim is None:
            raise ValueError("init_text_stream_from_class=True needs caption_dim (the text encoder's hidden size, "
                             "e.g. 2048 for Qwen3-1.7B): the caption projection is new.")
        class_state = {k: v for k, v in state.items() if not k.startswith("cls_embedding.")}
        config = ar_config_from_state_dict(state, image_size=image_size, downsample_factor=downsample_factor,
                                           preset=preset, num_attention_heads=num_attention_heads,
                                           condition_type="text", caption_dim=caption_dim, **settings)
        model = GEARForCausalImageLM(config)
        # Strict on everything but what the warm start creates: the caption projection and the text stream.
        expected = {k: v for k, v in model.state_dict().items() if not _is_new_in_text_warm_start(k)}
        check_state_dict(expected, class_state, what=f"image stream of the {where}")
        model.load_state_dict(class_state, strict=False)
        model.init_text_stream_from_image()
        description += ("; class-conditional weights loaded into the image stream, text stream copied from it, "
                        "caption projection newly initialised")
    else:
        config = ar_config_from_state_dict(state, image_size=image_size, downsample_factor=downsample_factor,
                                           preset=preset, num_attention_heads=num_attention_heads, **settings)
        model = GEARForCausalImageLM(config)
        model.load_state_dict(check_state_dict(model.state_dict(), state, what=where), strict=True)
    model.eval()
    description += f"; {settings_note}"
    logger.info("Loaded text-to-image AR generator from %s: %s", where, description)
    return model, description
