"""Sampling image-token grids from a GEAR / LlamaGen model, class- or text-conditional.

The loop is gpt-fast shaped: `prefill` runs the condition prefix (the class token, or the text positions),
`decode_one_token` one step of the static KV cache, `decode_n_tokens` the rest of the raster. With `compile=True`
the step is `torch.compile`d with static shapes (`compiled_decode_one_token`): its position is a tensor, so it is
traced once per model architecture / row count / dtype / device, never per position. Classifier-free
guidance runs the conditional and the unconditional sequence (null class, or the encoding of the empty prompt) as
one doubled batch `[cond; uncond]` and mixes the logits as `u + s * (c - u)` before the temperature, exactly as the
official samplers. The KV cache and the noise buffer are allocated once (a step allocates only activations and
logit temporaries), and nothing waits on the device (no `.item()`, no `torch.multinomial`): tokens are drawn with
the Gumbel-max trick from per-row uniform noise, which makes per-sample generators possible (with a list of
generators, one `uniform_` per row: the only per-row work of a step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CompileConfig

from .conditioning import GEARCondition


@dataclass(frozen=True)
class SamplingConfig:
    """Resolved sampling settings; attached to every generated grid as `grid.sampling_config`.

    Args:
        guidance_scale: CFG scale `s` (>= 1); 1 disables guidance (no unconditional rows are run).
        guidance_interval: official `cfg_interval`: `None` (or -1) guides every token; `n >= 0` guides image
            tokens `0 .. n + 1` (the first token plus `n + 1` decode steps), then uses the conditional logits only.
        do_sample: draw from the distribution; `False` takes the argmax (temperature/top-k/top-p then unused).
        temperature: divides the (guided) logits; must be > 0 when sampling.
        top_k: keep the `top_k` largest logits (all ties with the k-th kept); 0 disables. An explicit value above
            the codebook size is an error; a preset's value (e.g. "demo"'s 2000) is clamped to it with a warning.
        top_p: nucleus filter in (0, 1]: keep the smallest prefix of the sorted distribution whose mass reaches
            `top_p`, including the first token that crosses it; 1 disables.
        preset: name of the preset the values started from, if any.
    """

    guidance_scale: float = 1.0
    guidance_interval: int | None = None
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    preset: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def is_guided(self, token_index: int) -> bool:
        """Whether image token `token_index` (0-based raster index) is sampled with guidance."""
        if self.guidance_scale <= 1.0:
            return False
        return self.guidance_interval is None or token_index <= self.guidance_interval + 1


SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    # Official GEAR gFID protocol (src/inference.py, scripts/eval_gfid.sh).
    "fid": SamplingConfig(guidance_scale=1.0, top_k=0, top_p=1.0, temperature=1.0, preset="fid"),
    # LlamaGen's demo settings: strong guidance, top-k 2000.
    "demo": SamplingConfig(guidance_scale=4.0, top_k=2000, top_p=1.0, temperature=1.0, preset="demo"),
}


def resolve_sampling_config(preset: str | SamplingConfig | None = None, *, vocab_size: int | None = None,
                            **overrides) -> SamplingConfig:
    """Start from `preset` (a name in `SAMPLING_PRESETS`, a `SamplingConfig` or None = defaults), apply the
    non-None `overrides` and validate. An explicit `top_k` above `vocab_size` is an error; a preset's `top_k` is
    clamped to `vocab_size` (presets are written for K = 16384)."""
    if preset is None:
        settings = SamplingConfig()
    elif isinstance(preset, SamplingConfig):
        settings = preset
    elif preset in SAMPLING_PRESETS:
        settings = SAMPLING_PRESETS[preset]
    else:
        raise ValueError(f"Unknown sampling preset {preset!r}; choose one of {sorted(SAMPLING_PRESETS)} or None.")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SamplingConfig)} - {"preset"}
    if unknown:
        raise TypeError(f"Unknown sampling arguments: {sorted(unknown)}.")
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.guidance_interval == -1:
        settings = dataclasses.replace(settings, guidance_interval=None)

    s = settings
    if not s.guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {s.guidance_scale}.")
    if s.guidance_interval is not None and (not isinstance(s.guidance_interval, int) or s.guidance_interval < 0):
        raise ValueError(f"guidance_interval must be None/-1 (always guide) or an int >= 0, got "
                         f"{s.guidance_interval!r}.")
    if not isinstance(s.top_k, int) or isinstance(s.top_k, bool) or s.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {s.top_k!r}.")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {s.top_p}.")
    if s.do_sample and not s.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {s.temperature}; use do_sample=False for "
                         "greedy decoding.")
    if vocab_size is not None and s.top_k > vocab_size:
        if overrides.get("top_k") is not None:
            raise ValueError(f"top_k={s.top_k} exceeds the codebook size {vocab_size}; pass a top_k in "
                             f"[1, {vocab_size}], or 0 for no top-k filtering.")
        warnings.warn(f"top_k={s.top_k} exceeds the codebook size {vocab_size}; clamped to {vocab_size} "
                      "(no top-k filtering).", stacklevel=4)  # -> caller of model.generate_images
        settings = dataclasses.replace(settings, top_k=vocab_size)
    return settings


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set filtered logits to -inf (out of place). Top-k keeps every logit >= the k-th largest (ties kept);
    top-p keeps the sorted tokens up to and including the first whose cumulative probability exceeds `top_p`."""
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        remove_sorted[..., 1:] = cumulative[..., :-1] > top_p  # shift: the token crossing top_p stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def guide_logits(logits: torch.Tensor, batch_size: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on `[cond; uncond]` rows: `u + s * (c - u)`; plain rows pass through."""
    if logits.shape[0] == batch_size:
        return logits
    cond, uncond = logits[:batch_size], logits[batch_size:]
    return uncond + (cond - uncond) * guidance_scale


class TokenPicker:
    """Turns guided logits into tokens: argmax, or Gumbel-max sampling with per-row or shared generators.

    The uniform noise buffer is allocated once. With a list of generators row `i` only consumes generator `i`, so a
    sample's tokens do not depend on the batch it is drawn in.
    """

    def __init__(self, settings: SamplingConfig, batch_size: int, vocab_size: int, device: torch.device,
                 generator: torch.Generator | list[torch.Generator] | None):
        self.settings = settings
        self.device = device
        self.generators = generator if isinstance(generator, list) else None
        self.shared_generator = generator if isinstance(generator, torch.Generator) else None
        noise_device = device
        if self.generators is not None:
            noise_device = self.generators[0].device
        elif self.shared_generator is not None:
            noise_device = self.shared_generator.device
        self.noise = torch.empty(batch_size, vocab_size, device=noise_device) if settings.do_sample else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if not s.do_sample:
            return logits.argmax(dim=-1)
        logits = filter_top_k_top_p(logits / s.temperature, s.top_k, s.top_p)
        if self.generators is not None:
            for row, generator in zip(self.noise, self.generators):
                row.uniform_(generator=generator)
        else:
            self.noise.uniform_(generator=self.shared_generator)
        noise = self.noise.to(self.device, non_blocking=True)
        gumbel = -torch.log(-torch.log(noise))  # noise == 0 gives -inf: that token is never picked
        return (logits + gumbel).argmax(dim=-1)


def check_generators(generator, count: int, detail: str = ""):
    """`generator` as the sampler takes it: None, one `torch.Generator`, or a list of `count` (one per image, all on
    one device; returned as a list). Anything else is one clear error; `detail` explains the count."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"Got a list of {len(generator)} generators for {count} images{detail}; pass a list of "
                             f"{count} (exactly one generator per image), or a single torch.Generator.")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator lists must contain only torch.Generator objects.")
        if len({g.device for g in generator}) > 1:
            raise ValueError("All generators of the list must be on the same device.")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them (one per image) or None; got "
                        f"{type(generator).__name__}.")
    return generator


def prefill(model, condition: GEARCondition, cache) -> torch.Tensor:
    """Run the condition prefix of all rows into the empty cache; returns the logits of image token 0."""
    return model(**condition.model_kwargs(), cache=cache).logits[:, -1]


def decode_one_token(model, token: torch.Tensor, cache, position: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per row `(rows, 1)`; returns the logits of the next position. With `position` (a `(1,)`
    LongTensor: the token's sequence position) it is the static-shape `model.decode_step`, the compile target;
    without, the cached forward (which tracks the position in `cache.seq_length`)."""
    if position is not None:
        return model.decode_step(token, cache, position)
    return model(input_ids=token, cache=cache).logits[:, -1]


DEFAULT_COMPILE_CONFIG = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode="default")
_compiled_steps: dict[str, Callable] = {}


def compiled_decode_one_token(compile_config: CompileConfig | None = None) -> Callable:
    """`decode_one_token` under `torch.compile` with the `compile_config` settings, built once per settings (default:
    inductor, one graph, static shapes). Dynamo keeps one graph per model architecture, row count, dtype and
    device (its guards; models of one architecture share it): a new batch size compiles again, a new position
    never does. Under guidance with a `guidance_interval` that is two graphs, `[cond; uncond]` rows and then the
    conditional rows alone."""
    config = compile_config or DEFAULT_COMPILE_CONFIG
    # Not `config.to_dict()`: it deep-copies the backend (a callable backend must stay the caller's object).
    kwargs = {name: getattr(config, name) for name in ("fullgraph", "dynamic", "backend", "mode", "options")}
    key = repr(sorted(kwargs.items()))
    if key not in _compiled_steps:
        _compiled_steps[key] = torch.compile(decode_one_token, **kwargs)
    return _compiled_steps[key]


def decode_n_tokens(model, cache, tokens: torch.Tensor, start: int, pick: TokenPicker,
                    callback: Callable[[int], None] | None = None, static_step: Callable | None = None) -> None:
    """Fill `tokens[:, start:]` in place; `tokens[:, start - 1]` must already hold a sampled token.

    `static_step`: a `decode_one_token` to call with a position tensor (compiled, or itself for the static step in
    eager mode); None runs the cached forward. Once guidance stops the unconditional rows are no longer run: the
    cached forward takes the leading rows of the cache, the static step (which writes whole buffers) drops the
    others from the cache once."""
    batch_size = tokens.shape[0]
    feed = torch.empty(cache.batch_size, 1, dtype=torch.long, device=tokens.device)
    step, position = decode_one_token, None
    if static_step is not None:  # the position of token start - 1, advanced on the device: no new shapes, no sync
        step = static_step
        position = torch.full((1,), model.config.prefix_length + start - 1, dtype=torch.long, device=tokens.device)
    for t in range(start, tokens.shape[1]):
        guided = pick.settings.is_guided(t)
        if static_step is not None and not guided and cache.batch_size > batch_size:
            cache.keep_rows(batch_size)
        rows = cache.batch_size if guided else batch_size
        feed.view(-1, batch_size)[:] = tokens[:, t - 1]  # same token for the cond and uncond rows
        logits = step(model, feed[:rows], cache, position)
        if position is not None:
            position += 1
        tokens[:, t] = pick(guide_logits(logits, batch_size, pick.settings.guidance_scale))
        if callback is not None:
            callback(t)


def _sample_with_cache(model, condition: GEARCondition, tokens, pick, callback, static_step=None) -> None:
    cache = model.allocate_kv_cache(condition.batch_size)
    logits = prefill(model, condition, cache)
    tokens[:, 0] = pick(guide_logits(logits, tokens.shape[0], pick.settings.guidance_scale))
    if callback is not None:
        callback(0)
    decode_n_tokens(model, cache, tokens, 1, pick, callback, static_step)


def _sample_without_cache(model, condition: GEARCondition, tokens, pick, callback) -> None:
    """Reference loop: recompute the full prefix at every step (slow; for checks and benchmarks)."""
    batch_size = tokens.shape[0]
    for t in range(tokens.shape[1]):
        rows = condition.batch_size if pick.settings.is_guided(t) else batch_size
        prefix = tokens[:, :t].repeat(rows // batch_size, 1) if t > 0 else None
        logits = model(input_ids=prefix, **condition.rows(rows).model_kwargs()).logits[:, -1]
        tokens[:, t] = pick(guide_logits(logits, batch_size, pick.settings.guidance_scale))
        if callback is not None:
            callback(t)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()  # no class/token dropout while sampling
    try:
        yield
    finally:
        model.train(was_training)


def model_condition(model, class_labels=None, text_embeds=None, text_attention_mask=None) -> GEARCondition:
    """The `GEARCondition` of a call on `model`, checked against the model's condition type (one clear error)."""
    config = model.config
    device = model.tok_embeddings.weight.device
    if config.is_text_conditional:
        if class_labels is not None or text_embeds is None:
            raise ValueError("This model is text-conditional: pass text_embeds=(B, L, C) (and text_attention_mask), "
                             "e.g. from gear_hf.text_encoder.encode_prompts, not class labels.")
        model.check_text_condition(text_embeds, text_attention_mask)
        return GEARCondition(text_embeds=text_embeds, text_attention_mask=text_attention_mask).to(device)
    if text_embeds is not None or class_labels is None:
        raise ValueError("This model is class-conditional: pass class_labels=(B,), not text_embeds.")
    class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    model.check_class_labels(class_labels)
    return GEARCondition(class_labels=class_labels)


def unconditional(model, condition: GEARCondition, null_text_embeds=None,
                  null_text_attention_mask=None) -> GEARCondition:
    """The unconditional half of a CFG batch: the null class, or the given encoding of the empty prompt."""
    config = model.config
    if not condition.is_text:
        if not config.has_null_class:
            raise ValueError("guidance_scale > 1 needs the null class, but this model has class_dropout_prob == 0 "
                             "(no null-class embedding). Use guidance_scale=1.")
        return GEARCondition(class_labels=torch.full_like(condition.class_labels[:1], config.null_class_id))
    if null_text_embeds is None:
        raise ValueError("guidance_scale > 1 needs the unconditional text condition: pass null_text_embeds (and "
                         "null_text_attention_mask), the encoding of the empty prompt \"\" (official), e.g. "
                         "gear_hf.text_encoder.encode_prompts(tokenizer, text_encoder, [\"\"]).")
    model.check_text_condition(null_text_embeds, null_text_attention_mask)
    return GEARCondition(text_embeds=null_text_embeds, text_attention_mask=null_text_attention_mask)


def generate_image_tokens(
    model,
    class_labels: torch.Tensor | list[int] | None = None,
    *,
    text_embeds: torch.Tensor | None = None,
    text_attention_mask: torch.Tensor | None = None,
    null_text_embeds: torch.Tensor | None = None,
    null_text_attention_mask: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_interval: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    preset: str | SamplingConfig | None = None,
    use_cache: bool = True,
    compile: bool | CompileConfig = False,
    callback: Callable[[int], None] | None = None,
) -> torch.LongTensor:
    """Sample image-token grids `(B, grid_size, grid_size)` for `class_labels` (B,) of a class-conditional model,
    or for `text_embeds` (B, L, C) + `text_attention_mask` (B, L) of a text-conditional one.

    Settings start from `preset` (`"fid"`: the official evaluation, no guidance; `"demo"`: LlamaGen's demo,
    guidance 4, top-k 2000; None: `SamplingConfig()` defaults = `"fid"`); any argument that is not None overrides
    the preset. The resolved `SamplingConfig` is attached to the result as `grid.sampling_config` (a plain Python
    attribute of the returned tensor: read it before moving/copying the tensor).

    Guidance pairs every row with an unconditional one: the null class, or (text) `null_text_embeds` /
    `null_text_attention_mask`, the encoding of the empty prompt `""` as in the official code, given as one row
    (broadcast) or B rows.

    `generator` is one `torch.Generator` shared by the batch, or a list of B generators (one per sample, so each
    sample is reproducible whatever the batch size), or None (global RNG). `use_cache=False` recomputes the whole
    prefix every step (reference path, much slower). `callback(t)` is called after token t (raster index) of
    every sample has been drawn, e.g. to drive a progress bar. The model is put in eval mode for the call.

    `compile=True` runs the decode steps through `torch.compile` (`DEFAULT_COMPILE_CONFIG`: inductor, one
    static-shape graph); a `transformers.CompileConfig` is passed to `torch.compile` as given (mind its own
    defaults `fullgraph=False, dynamic=None, mode="reduce-overhead"`), e.g. `CompileConfig(backend="aot_eager",
    fullgraph=True, dynamic=False, mode=None)`. The prefill stays eager. The first call of a model architecture and
    batch size pays the compilation, later calls reuse it. In fp32 the tokens are those of the eager path (logits
    agree to float rounding, ~1e-6); in bf16 a near-tie may round the other way.
    """
    config = model.config
    device = model.tok_embeddings.weight.device
    # 1. Check inputs.
    settings = resolve_sampling_config(
        preset, vocab_size=config.vocab_size, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
    )
    condition = model_condition(model, class_labels, text_embeds, text_attention_mask)
    batch_size = condition.batch_size
    if batch_size == 0:
        raise ValueError("The condition is empty; pass at least one class label or prompt embedding.")
    generator = check_generators(generator, batch_size)
    if not isinstance(compile, (bool, CompileConfig)):
        raise TypeError(f"compile must be True/False or a transformers.CompileConfig, got {type(compile).__name__}.")
    if compile is not False and not use_cache:
        raise ValueError("compile compiles the KV-cached decode step: it needs use_cache=True.")
    static_step = compiled_decode_one_token(None if compile is True else compile) if compile is not False else None

    # 2. Conditioning rows: [cond; uncond] under guidance.
    if settings.guidance_scale > 1.0:
        null = unconditional(model, condition, null_text_embeds, null_text_attention_mask)
        condition = condition.with_unconditional(null.to(device))

    # 3. Decode the raster.
    tokens = torch.empty(batch_size, config.num_image_tokens, dtype=torch.long, device=device)
    pick = TokenPicker(settings, batch_size, config.vocab_size, device, generator)
    with torch.no_grad(), _eval_mode(model):
        if use_cache:
            _sample_with_cache(model, condition, tokens, pick, callback, static_step)
        else:
            _sample_without_cache(model, condition, tokens, pick, callback)

    grid = tokens.view(batch_size, config.grid_size, config.grid_size)
    grid.sampling_config = settings
    return grid


__all__ = [
    "SamplingConfig",
    "SAMPLING_PRESETS",
    "resolve_sampling_config",
    "filter_top_k_top_p",
    "guide_logits",
    "TokenPicker",
    "prefill",
    "decode_one_token",
    "decode_n_tokens",
    "compiled_decode_one_token",
    "DEFAULT_COMPILE_CONFIG",
    "generate_image_tokens",
    "model_condition",
    "unconditional",
]
