"""Text-to-image: the text-conditional AR contract, its masks and cache, conversion, and GEARPipeline(prompt=...)
with a tiny random Qwen3 text encoder and an in-memory byte-level Qwen2 tokenizer (tiny CPU models)."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from text_fixtures import byte_level_tokenizer, tiny_text_encoder
from transformers import AutoModelForCausalLM

from gear_hf import GEARConfig, GEARForCausalImageLM, GEARPipeline, GEARTokenizerConfig, GEARTokenizerModel
from gear_hf.conditioning import GEARCondition
from gear_hf.conversion import (CheckpointMismatchError, load_ar_from_official_checkpoint,
                                load_t2i_from_official_checkpoint)

CODEBOOK, IMAGE_SIZE, TEXT_LENGTH, CAPTION_DIM = 64, 16, 12, 32  # tokenizer stride 4 -> 4x4 = 16 image tokens
L = 16
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def t2i_config(**overrides):
    sizes = dict(condition_type="text", vocab_size=CODEBOOK, hidden_size=64, num_hidden_layers=3,
                 num_attention_heads=4, image_size=IMAGE_SIZE, downsample_factor=4, caption_dim=CAPTION_DIM,
                 text_length=TEXT_LENGTH)
    return GEARConfig(**{**sizes, **overrides})


def random_t2i(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GEARForCausalImageLM(t2i_config(**overrides))
    with torch.no_grad():  # the head is zero-initialised: give every weight O(1) effect
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_t2i()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, TEXT_LENGTH, CAPTION_DIM, generator=g)
    mask = torch.zeros(3, TEXT_LENGTH, dtype=torch.long)
    mask[0], mask[1, :4] = 1, 1  # full, short; row 2 all padding
    return torch.randint(0, CODEBOOK, (3, L), generator=g), text, mask


# ---------------------------------------------------------------------------------------------- config
def test_presets_and_dual_stream_defaults():
    one_b = GEARConfig.from_preset("LlamaGen-1B", condition_type="text")
    assert (one_b.num_hidden_layers, one_b.num_attention_heads, one_b.hidden_size, one_b.head_dim) == (36, 20, 1440, 72)
    assert one_b.num_double_stream_layers == 12 and one_b.intermediate_size == 3840 and one_b.prefix_length == 300
    with torch.device("meta"):
        params = GEARForCausalImageLM(one_b).num_parameters()
    assert round(params / 1e6, 2) == 1047.66  # official count with caption_dim 2048
    assert GEARConfig.from_preset("LlamaGen-B", condition_type="text").num_double_stream_layers == 4
    assert GEARConfig.from_preset("LlamaGen-L", condition_type="text").num_double_stream_layers == 8
    assert GEARConfig.from_preset("LlamaGen-B").num_double_stream_layers == 0  # class-conditional: none


@pytest.mark.parametrize("overrides, match", [
    ({"condition_type": "image"}, "condition_type must be one of"),
    ({"text_attention": "full"}, "text_attention must be one of"),
    ({"num_double_stream_layers": 4}, r"num_double_stream_layers must be an int in \[0, num_hidden_layers=3\]"),
    ({"caption_dim": 0}, "caption_dim must be a positive integer"),
    ({"condition_type": "class", "num_double_stream_layers": 1}, "text-conditional models only"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        t2i_config(**overrides)


# ---------------------------------------------------------------------------------------------- forward
def test_forward_contract(model, batch):
    tokens, text, mask = batch
    with torch.no_grad():
        out = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask, labels=tokens,
                    output_hidden_states=True)
        one_hot = model(input_probs=torch.nn.functional.one_hot(tokens[:, :-1], CODEBOOK).float(),
                        text_embeds=text, text_attention_mask=mask).logits
        stopped = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask, stop_at_layer=2)
    assert out.logits.shape == (3, L, CODEBOOK)  # logits[:, t] is image token t, as for class labels
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()))
    assert len(out.hidden_states) == 4 and all(h.shape == (3, L, 64) for h in out.hidden_states)
    assert (one_hot - out.logits).abs().max() <= 1e-5
    assert torch.equal(stopped.last_hidden_state, out.hidden_states[2]) and stopped.logits is None


def test_padding_semantics(model, batch):
    """Padded text slots are never attended except by themselves; token 0 comes from the last text slot whatever
    the mask says; an all-padding caption gives the image no text at all."""
    tokens, text, mask = batch
    other = text.clone()
    other[1, 4:] += 5.0  # change only the padded slots of the short caption ...
    other[1, -1] = text[1, -1]  # ... except the last slot, which predicts token 0
    other[2, :-1] += 5.0  # all-padding row: change everything but the last slot
    with torch.no_grad():
        base = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask).logits
        moved = model(tokens[:, :-1], text_embeds=other, text_attention_mask=mask).logits
        last = text.clone()
        last[2, -1] += 5.0
        moved_last = model(tokens[:, :-1], text_embeds=last, text_attention_mask=mask).logits
        all_text = text.clone()
        all_text[2] += 5.0
        moved_all = model(tokens[:, :-1], text_embeds=all_text, text_attention_mask=mask).logits
    assert torch.equal(base[1:], moved[1:])  # padded slots changed nothing
    assert not torch.equal(base[2, 0], moved_last[2, 0])  # the last slot's own features reach image token 0
    assert torch.equal(base[2, 1:], moved_all[2, 1:])  # all padding: image positions see no text


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_cache_equals_full_forward_including_cfg_row_subsets(batch, mode):
    model = random_t2i(seed=1, text_attention=mode)
    tokens, text, mask = batch
    with torch.no_grad():
        full = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask).logits
        cache = model.allocate_kv_cache(3)
        steps = [model(text_embeds=text, text_attention_mask=mask, cache=cache).logits]
        steps += [model(tokens[:2, t : t + 1], cache=cache).logits for t in range(L - 1)]  # rows 0-1 only
        chunked = model.allocate_kv_cache(3)
        first = model(tokens[:, :5], text_embeds=text, text_attention_mask=mask, cache=chunked).logits
        rest = model(tokens[:, 5:-1], cache=chunked).logits
    assert steps[0].shape == (3, 1, CODEBOOK)
    assert (torch.cat([steps[0][:2]] + steps[1:], dim=1) - full[:2]).abs().max() <= 1e-5
    assert (torch.cat([first, rest], dim=1) - full).abs().max() <= 1e-5


def test_condition_errors(model, batch):
    tokens, text, mask = batch
    with pytest.raises(ValueError, match="text-conditional .* instead of class_labels"):
        model(tokens[:, :-1], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="caption_dim is 32: encode prompts with the text encoder"):
        model(tokens[:, :-1], text_embeds=torch.randn(3, TEXT_LENGTH, 16))
    with pytest.raises(ValueError, match="pad / truncate the prompts to 12 tokens"):
        model(tokens[:, :-1], text_embeds=torch.randn(3, 5, CAPTION_DIM))
    with pytest.raises(ValueError, match="text_embeds are required"):
        model(tokens[:, :-1])
    with pytest.raises(ValueError, match="needs the unconditional text condition"):
        model.generate_images(text_embeds=text, text_attention_mask=mask, guidance_scale=2.0)
    with pytest.raises(ValueError, match="text-conditional: pass text_embeds"):
        model.generate_images(torch.tensor([1]))
    c2i = GEARForCausalImageLM(GEARConfig(vocab_size=CODEBOOK, num_classes=4, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=IMAGE_SIZE, downsample_factor=4))
    with pytest.raises(ValueError, match="class-conditional .* not text_embeds"):
        c2i(tokens[:, :-1], text_embeds=text)
    with pytest.raises(ValueError, match="Pass either class_labels or text_embeds, not both"):
        model(tokens[:, :-1], torch.tensor([0, 1, 2]), text_embeds=text)
    with pytest.raises(ValueError, match="The condition is empty"):
        model.generate_images(text_embeds=text[:0], text_attention_mask=mask[:0])
    null = text[:1] * 0
    with pytest.raises(ValueError, match="unconditional condition has 2 rows; give 1 .broadcast. or 3"):
        model.generate_images(text_embeds=text, text_attention_mask=mask, null_text_embeds=null.expand(2, -1, -1),
                              guidance_scale=2.0)
    with pytest.raises(ValueError, match="same kind .class or text."):
        GEARCondition(text_embeds=text).with_unconditional(GEARCondition(class_labels=torch.tensor([4])))
    with pytest.raises(ValueError, match="must share .L, C."):
        GEARCondition(text_embeds=text).with_unconditional(GEARCondition(text_embeds=text[:1, :5]))
    with pytest.raises(ValueError, match="holds either class_labels or text_embeds"):
        GEARCondition()
    with pytest.raises(ValueError, match=r"text_attention_mask must be \(B, L\) = \(3, 12\)"):
        GEARCondition(text_embeds=text, text_attention_mask=mask[:, :5])


def test_sampling_is_reproducible_per_sample_and_uses_the_text(model, batch):
    _, text, mask = batch
    null = (torch.zeros(1, TEXT_LENGTH, CAPTION_DIM), torch.zeros(1, TEXT_LENGTH, dtype=torch.long))
    kwargs = dict(null_text_embeds=null[0], null_text_attention_mask=null[1], guidance_scale=3.0)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    grid = model.generate_images(text_embeds=text, text_attention_mask=mask, generator=gens, **kwargs)
    alone = model.generate_images(text_embeds=text[1:2], text_attention_mask=mask[1:2],
                                  generator=[torch.Generator().manual_seed(1)], **kwargs)
    assert grid.shape == (3, 4, 4) and torch.equal(grid[1], alone[0])
    assert grid.sampling_config.guidance_scale == 3.0
    greedy = model.generate_images(text_embeds=text, text_attention_mask=mask, do_sample=False, **kwargs)
    uncached = model.generate_images(text_embeds=text, text_attention_mask=mask, do_sample=False, use_cache=False,
                                     **kwargs)
    assert torch.equal(greedy, uncached)
    shifted = model.generate_images(text_embeds=text + 1.0, text_attention_mask=mask, do_sample=False, **kwargs)
    assert not torch.equal(greedy[0], shifted[0])


def test_auto_class_round_trip(model, batch, tmp_path):
    import gear_hf  # noqa: F401  (registers the Auto classes)

    tokens, text, mask = batch
    model.save_pretrained(tmp_path / "t2i")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "t2i")
    assert isinstance(loaded, GEARForCausalImageLM) and loaded.config.condition_type == "text"
    with torch.no_grad():
        a = model(tokens[:, :-1], text_embeds=text, text_attention_mask=mask).logits
        b = loaded(tokens[:, :-1], text_embeds=text, text_attention_mask=mask).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- conversion
def class_checkpoint(path):
    torch.manual_seed(5)
    c2i = GEARForCausalImageLM(GEARConfig(vocab_size=CODEBOOK, num_classes=4, hidden_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=IMAGE_SIZE, downsample_factor=4))
    torch.save({"ema": c2i.state_dict(), "args": {"ar_model": None}}, path)
    return c2i


def test_text_stream_initialised_from_a_class_checkpoint(tmp_path):
    c2i = class_checkpoint(tmp_path / "c2i.pt")
    with pytest.raises(CheckpointMismatchError, match="is class-conditional .* init_text_stream_from_class=True"):
        load_t2i_from_official_checkpoint(tmp_path / "c2i.pt", image_size=IMAGE_SIZE, downsample_factor=4,
                                          num_attention_heads=4)
    with pytest.raises(ValueError, match="needs caption_dim"):
        load_t2i_from_official_checkpoint(tmp_path / "c2i.pt", image_size=IMAGE_SIZE, downsample_factor=4,
                                          num_attention_heads=4, init_text_stream_from_class=True)
    t2i, description = load_t2i_from_official_checkpoint(
        tmp_path / "c2i.pt", image_size=IMAGE_SIZE, downsample_factor=4, num_attention_heads=4,
        init_text_stream_from_class=True, caption_dim=CAPTION_DIM, text_length=TEXT_LENGTH)
    assert "text stream copied" in description and t2i.config.caption_dim == CAPTION_DIM
    assert t2i.config.text_length == TEXT_LENGTH and t2i.config.num_double_stream_layers == 1
    block = t2i.layers[0]
    assert torch.equal(block.attention.wqkv_text.weight, c2i.layers[0].attention.wqkv.weight)
    assert torch.equal(block.attention_norm_text.weight, c2i.layers[0].attention_norm.weight)
    assert torch.equal(t2i.layers[2].feed_forward.w1.weight, c2i.layers[2].feed_forward.w1.weight)
    assert not hasattr(t2i.layers[1].attention, "wqkv_text")
    # strict on the image stream: a missing or extra class-conditional weight is an error, not a random init
    state = c2i.state_dict()
    for edit, match in ((lambda s: s.pop("layers.2.feed_forward.w2.weight"), "layers.2.feed_forward.w2.weight"),
                        (lambda s: s.__setitem__("layers.0.extra", torch.zeros(1)), "layers.0.extra")):
        broken = dict(state)
        edit(broken)
        with pytest.raises(CheckpointMismatchError, match=match):
            load_t2i_from_official_checkpoint({"ema": broken}, image_size=IMAGE_SIZE, downsample_factor=4,
                                              num_attention_heads=4, init_text_stream_from_class=True,
                                              caption_dim=CAPTION_DIM, text_length=TEXT_LENGTH)


def test_converters_refuse_the_other_kind(model):
    t2i = {"ema": model.state_dict()}
    with pytest.raises(CheckpointMismatchError, match="is a text-to-image model .* load_t2i_from_official_checkpoint"):
        load_ar_from_official_checkpoint(t2i, image_size=IMAGE_SIZE, downsample_factor=4, num_attention_heads=4)
    with pytest.raises(CheckpointMismatchError, match="already text-conditional: convert it without that option"):
        load_t2i_from_official_checkpoint(t2i, image_size=IMAGE_SIZE, downsample_factor=4, num_attention_heads=4,
                                          init_text_stream_from_class=True, caption_dim=CAPTION_DIM)


def test_t2i_settings_precedence_and_cli(model, tmp_path, capsys):
    torch.save({"ar": model.state_dict(), "args": {"cls_token_num": TEXT_LENGTH, "text_attn": "prefix"}},
               tmp_path / "t2i.pt")
    loaded, description = load_t2i_from_official_checkpoint(tmp_path / "t2i.pt", image_size=IMAGE_SIZE,
                                                            downsample_factor=4, num_attention_heads=4)
    assert loaded.config.text_attention == "prefix" and "text_attention='prefix' (checkpoint args)" in description
    with pytest.raises(ValueError, match="contradicts the checkpoint's saved args"):
        load_t2i_from_official_checkpoint(tmp_path / "t2i.pt", image_size=IMAGE_SIZE, downsample_factor=4,
                                          num_attention_heads=4, text_attention="causal")
    torch.save({"ar": model.state_dict()}, tmp_path / "bare.pt")
    defaults, _ = load_t2i_from_official_checkpoint(tmp_path / "bare.pt", image_size=IMAGE_SIZE,
                                                    downsample_factor=4, num_attention_heads=4,
                                                    text_length=TEXT_LENGTH)
    assert defaults.config.text_attention == "causal"  # the official default
    assert torch.equal(defaults.output.weight, model.output.weight)

    spec = importlib.util.spec_from_file_location("convert_checkpoint_t2i", REPO / "scripts" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["t2i", "--checkpoint", str(tmp_path / "t2i.pt"), "--output", str(tmp_path / "out"),
                     "--image-size", str(IMAGE_SIZE), "--downsample", "4", "--num-heads", "4"]) == 0
    assert "Weights used: GEAR checkpoint ['ar']" in capsys.readouterr().out
    assert GEARForCausalImageLM.from_pretrained(tmp_path / "out").config.text_attention == "prefix"
    class_checkpoint(tmp_path / "c2i.pt")
    assert cli.main(["t2i", "--checkpoint", str(tmp_path / "c2i.pt"), "--output", str(tmp_path / "x"),
                     "--image-size", str(IMAGE_SIZE), "--downsample", "4", "--num-heads", "4"]) == 2
    assert "--init-text-stream-from-class-conditional --caption-dim N" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pipeline
def tiny_tokenizer_model():
    torch.manual_seed(11)
    config = GEARTokenizerConfig(quantizer="vq", codebook_size=CODEBOOK, image_size=IMAGE_SIZE, base_channels=32,
                                 channel_multipliers=[1, 1, 2], num_res_blocks=1, z_channels=32)
    return GEARTokenizerModel(config).eval()


@pytest.fixture(scope="module")
def t2i_pipe(model):
    tokenizer = byte_level_tokenizer()
    pipe = GEARPipeline(vq_model=tiny_tokenizer_model(), transformer=model, text_encoder=tiny_text_encoder(tokenizer),
                        tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_prompt_to_image_round_trip_through_a_saved_pipeline(t2i_pipe, tmp_path):
    prompts = ["a red car", "a cat on a sofa"]
    out = t2i_pipe(prompts, guidance_scale=3.0, num_images_per_prompt=2, generator=gens(0, 1, 2, 3),
                   output_type="np")
    assert out.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and out.class_labels is None
    assert out.prompts == ["a red car", "a red car", "a cat on a sofa", "a cat on a sofa"]
    t2i_pipe.save_pretrained(tmp_path / "pipe")
    loaded = GEARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_encoder).__name__ == "Qwen3Model" and type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"
    again = loaded(prompt=prompts, guidance_scale=3.0, num_images_per_prompt=2, generator=gens(0, 1, 2, 3),
                   output_type="np")
    assert (again.images == out.images).all()  # bit-identical after save / load
    pil = loaded("a red car", guidance_scale=3.0, generator=gens(0)).images[0]
    assert pil.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_prompt_embeds_and_negative_prompt(t2i_pipe):
    embeds, mask = t2i_pipe.encode_prompt(["a red car"])
    assert embeds.shape == (1, TEXT_LENGTH, CAPTION_DIM) and mask.sum().item() == len("a red car")
    by_text = t2i_pipe("a red car", guidance_scale=3.0, generator=gens(5), output_type="latent").images
    by_embeds = t2i_pipe(prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=3.0, generator=gens(5),
                         output_type="latent").images
    assert torch.equal(by_text, by_embeds)
    null_embeds, null_mask = t2i_pipe.encode_prompt("")
    assert null_mask.sum() == 0  # "" has no token (no BOS): the official unconditional condition
    explicit_null = t2i_pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=null_embeds,
                             negative_prompt_attention_mask=null_mask, guidance_scale=3.0, generator=gens(5),
                             output_type="latent").images
    assert torch.equal(by_text, explicit_null)
    negative = t2i_pipe("a red car", negative_prompt="blurry", guidance_scale=3.0, do_sample=False,
                        output_type="latent").images
    plain = t2i_pipe("a red car", guidance_scale=3.0, do_sample=False, output_type="latent").images
    assert not torch.equal(negative, plain)


def test_pipeline_input_errors(t2i_pipe, model, caplog):
    with pytest.raises(ValueError, match="text-to-image: pass prompt=.*class_labels are for"):
        t2i_pipe(class_labels=[1])
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        t2i_pipe([1, 2])
    with pytest.raises(ValueError, match="empty list"):
        t2i_pipe([])
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        t2i_pipe("a", prompt_embeds=torch.zeros(1, TEXT_LENGTH, CAPTION_DIM))
    with caplog.at_level(logging.WARNING, logger="gear_hf.text_encoder"):
        t2i_pipe("x" * 40, output_type="latent", generator=gens(0))
    assert "1 of 1 prompts are longer than 12 tokens and were truncated" in caplog.text
    tokenizer = byte_level_tokenizer()
    with pytest.raises(ValueError, match="16"):  # hidden size 16 vs caption_dim 32: names both and the fix
        GEARPipeline(vq_model=tiny_tokenizer_model(), transformer=model,
                     text_encoder=tiny_text_encoder(tokenizer, hidden_size=16), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs its text_encoder and tokenizer"):
        GEARPipeline(vq_model=tiny_tokenizer_model(), transformer=model)


def test_text_to_image_model_cards(t2i_pipe, model):
    from gear_hf.hub import create_model_card

    card = create_model_card(t2i_pipe, repo_id="me/gear-t2i", license="apache-2.0")
    text = str(card)
    assert card.data.pipeline_tag == "text-to-image" and "text-to-image" in card.data.tags
    assert "complete text-to-image GEAR generator" in text and "text_encoder" in text
    assert 'pipe("a red sports car on a beach"' in text and "class_labels" not in text
    generator_card = str(create_model_card(model, repo_id="me/gear-t2i-ar", license="apache-2.0"))
    assert "text-conditional LlamaGen" in generator_card and "caption_dim 32" in generator_card
