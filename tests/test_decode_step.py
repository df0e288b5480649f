"""The static-shape decode step (`GEARForCausalImageLM.decode_step`) and `generate_images(compile=...)`.

The step is checked against the eager cached forward value by value, then the sampler's static path against the
eager sampler grid by grid (class / text, greedy / sampled, with and without guidance and `guidance_interval`),
with the step run eagerly (cheap); `torch.compile` itself runs on tiny models only: through `aot_eager` (dynamo
capture + AOT functionalization of the in-place cache writes, about a second per graph on CPU), counting the graphs
it builds, and once through the default inductor backend (C++ codegen, several seconds: marked slow).
"""

import pytest
import torch
from test_ar import random_model
from test_t2i import CAPTION_DIM, TEXT_LENGTH, random_t2i
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import CompileConfig

from gear_hf import GEARPipeline
from gear_hf import sampling as sampling_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def class_model():
    return random_model(seed=2)


@pytest.fixture(scope="module")
def text_model():
    return random_t2i(seed=2)


def text_condition(batch: int, guided: bool = True) -> dict:
    g = torch.Generator().manual_seed(4)
    mask = torch.zeros(batch, TEXT_LENGTH, dtype=torch.long)
    for row in range(batch):
        mask[row, : (5 * row + 3) % (TEXT_LENGTH + 1)] = 1  # 3, 8, 0 (all padding), ... real tokens
    kwargs = {"text_embeds": torch.randn(batch, TEXT_LENGTH, CAPTION_DIM, generator=g), "text_attention_mask": mask}
    if guided:
        kwargs.update(null_text_embeds=torch.zeros(1, TEXT_LENGTH, CAPTION_DIM),
                      null_text_attention_mask=torch.zeros(1, TEXT_LENGTH, dtype=torch.long))
    return kwargs


def gens(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize("kind", ["class", "text-causal", "text-prefix"])
def test_decode_step_equals_the_cached_forward_at_every_position(kind):
    if kind == "class":
        model, condition = random_model(seed=3), {"class_labels": torch.tensor([0, 5, 10])}
    else:
        model = random_t2i(seed=3, text_attention=kind.removeprefix("text-"))
        condition = text_condition(3, guided=False)
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (3, config.num_image_tokens - 1),
                           generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager, static = model.allocate_kv_cache(3), model.allocate_kv_cache(3)
        model(**condition, cache=eager)
        model(**condition, cache=static)
        position = torch.tensor([config.prefix_length])
        for t in range(tokens.shape[1]):
            expected = model(tokens[:, t : t + 1], cache=eager).logits[:, -1]
            got = model.decode_step(tokens[:, t : t + 1], static, position)
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert (got - expected).abs().max() <= 1e-5, t
            position += 1
    assert static.seq_length == config.prefix_length  # the static step never reads nor advances it
    filled = model.max_sequence_length - 1
    for layer in range(config.num_hidden_layers):
        assert (static.keys[layer][:, :, :filled] - eager.keys[layer][:, :, :filled]).abs().max() <= 1e-5
        assert (static.values[layer][:, :, :filled] - eager.values[layer][:, :, :filled]).abs().max() <= 1e-5


def test_step_mask_and_keep_rows(text_model):
    condition = text_condition(2)
    with torch.no_grad():
        cache = text_model.allocate_kv_cache(2)
        text_model(text_embeds=condition["text_embeds"], text_attention_mask=condition["text_attention_mask"],
                   cache=cache)
    position = torch.tensor([TEXT_LENGTH + 2])
    mask = cache.step_mask(position)
    keys = torch.arange(cache.max_length)
    expected = (keys <= position) & torch.cat(
        [condition["text_attention_mask"].bool(), torch.ones(2, cache.max_length - TEXT_LENGTH, dtype=torch.bool)], 1)
    assert mask.shape == (2, 1, 1, cache.max_length) and torch.equal(mask[:, 0, 0], expected)

    kept = [k[:1].clone() for k in cache.keys]
    cache.keep_rows(1)
    assert cache.batch_size == 1 and all(torch.equal(a, b) for a, b in zip(cache.keys, kept))
    assert torch.equal(cache.step_mask(position)[:, 0, 0], expected[:1])
    with pytest.raises(ValueError, match=r"writes all 1 rows .* keep_rows\(2\)"):
        text_model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, position)


# ---------------------------------------------------------------------------------------------- static sampler

CASES = [
    {"guidance_scale": 3.0, "do_sample": False},
    {"guidance_scale": 2.0, "guidance_interval": 3, "do_sample": False},
    {"guidance_scale": 2.0, "guidance_interval": 1, "top_k": 8},
    {"top_p": 0.8, "temperature": 0.7},
]


@pytest.fixture
def static_steps(monkeypatch):
    """`compile=...` runs the static-shape step without compiling it; records (rows, position) of every call."""
    calls = []

    def static_step(model, token, cache, position):
        calls.append((token.shape[0], int(position)))
        return sampling_module.decode_one_token(model, token, cache, position)

    monkeypatch.setattr(sampling_module, "compiled_decode_one_token", lambda config=None: static_step)
    return calls


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("kind", ["class", "text"])
def test_static_sampler_draws_the_eager_grids(class_model, text_model, kind, kwargs, static_steps):
    model, condition = (class_model, {"class_labels": torch.tensor([1, 4, 7])}) if kind == "class" else \
        (text_model, text_condition(3))
    eager = model.generate_images(**condition, generator=gens(3), **kwargs)
    static = model.generate_images(**condition, generator=gens(3), compile=True, **kwargs)
    assert torch.equal(eager, static)
    assert static.sampling_config == eager.sampling_config
    c = model.config
    settings = static.sampling_config
    expected = [(6 if settings.is_guided(t) else 3, c.prefix_length + t - 1) for t in range(1, c.num_image_tokens)]
    assert static_steps == expected  # every decode step static, at its position, 2B rows only while guided


def test_compile_argument_errors(class_model):
    with pytest.raises(TypeError, match="compile must be True/False or a transformers.CompileConfig"):
        class_model.generate_images(torch.tensor([1]), compile="inductor")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        class_model.generate_images(torch.tensor([1]), compile=True, use_cache=False)


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    """Dynamo's per-function graph limit (`recompile_limit`) counts every graph of `decode_one_token`: start empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting(backend: str = "aot_eager") -> tuple[CompileCounterWithBackend, CompileConfig]:
    counter = CompileCounterWithBackend(backend)
    return counter, CompileConfig(backend=counter, fullgraph=True, dynamic=False, mode=None)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_step_traces_once_per_row_count(class_model):
    """One graph for the 2B guided rows and one for the B conditional rows after `guidance_interval` (the same
    graph as unguided sampling of B rows), never one per position, reused by later calls; no graph breaks."""
    counter, config = counting()
    labels = torch.tensor([1, 4, 7])
    breaks = sum(counters["graph_break"].values())
    kwargs = {"guidance_scale": 2.0, "guidance_interval": 2, "do_sample": False}
    compiled = class_model.generate_images(labels, compile=config, **kwargs)
    assert torch.equal(compiled, class_model.generate_images(labels, **kwargs))
    assert counter.frame_count == 2
    sampled = class_model.generate_images(labels, compile=config, top_k=8, generator=gens(3, 10), **kwargs)
    assert torch.equal(sampled, class_model.generate_images(labels, top_k=8, generator=gens(3, 10), **kwargs))
    unguided = class_model.generate_images(labels, compile=config, generator=gens(3))
    assert torch.equal(unguided, class_model.generate_images(labels, generator=gens(3)))
    assert counter.frame_count == 2  # new settings, generators and an unguided call: no new graph
    class_model.generate_images(labels[:2], compile=config, do_sample=False)
    assert counter.frame_count == 3  # a new batch size is a new static shape
    assert sum(counters["graph_break"].values()) == breaks


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_text_sampling_and_pipeline_pass_through(text_model, class_model):
    counter, config = counting()
    condition = text_condition(2)
    kwargs = {"guidance_scale": 3.0, "guidance_interval": 4}
    compiled = text_model.generate_images(**condition, compile=config, generator=gens(2), **kwargs)
    assert torch.equal(compiled, text_model.generate_images(**condition, generator=gens(2), **kwargs))
    assert counter.frame_count == 2

    from test_pipeline import tiny_tokenizer

    tokenizer = tiny_tokenizer(image_size=64, channel_multipliers=(1, 1, 1, 1, 1))  # stride 16: the AR's 4x4 grid
    pipe = GEARPipeline(vq_model=tokenizer, transformer=class_model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([2, 3], guidance_scale=2.0, generator=gens(2), output_type="latent", compile=config)
    assert torch.equal(out.images, pipe([2, 3], guidance_scale=2.0, generator=gens(2), output_type="latent").images)
    assert counter.frame_count == 3  # the class model's 4-row graph


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_default_inductor_compile_draws_the_eager_grid():
    model = random_model(seed=4)
    labels = torch.tensor([3, 8])
    eager = model.generate_images(labels, guidance_scale=3.0, do_sample=False)
    assert torch.equal(model.generate_images(labels, guidance_scale=3.0, do_sample=False, compile=True), eager)
