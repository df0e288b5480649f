"""GEARPipeline: output types, labels, generators, save/load, component and input checks (tiny CPU models)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ImagePipelineOutput

from gear_hf import GEARConfig, GEARForCausalImageLM, GEARPipeline, GEARTokenizerConfig, GEARTokenizerModel
from gear_hf.pipelines import check_components_compatible, to_uint8

CODEBOOK = 64
NUM_CLASSES = 10
IMAGE_SIZE = 16  # tokenizer downsamples by 4 -> 4x4 = 16 tokens per image
NAMES = {i: f"class{i}, alias{i}" for i in range(NUM_CLASSES)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def tiny_tokenizer(codebook_size=CODEBOOK, image_size=IMAGE_SIZE, channel_multipliers=(1, 1, 2)):
    config = GEARTokenizerConfig(quantizer="vq", codebook_size=codebook_size, image_size=image_size, base_channels=32,
                                 channel_multipliers=list(channel_multipliers), num_res_blocks=1, z_channels=32)
    return GEARTokenizerModel(config).eval()


def tiny_ar(vocab_size=CODEBOOK, image_size=IMAGE_SIZE, downsample_factor=4, class_dropout_prob=0.1,
            num_classes=NUM_CLASSES, **kwargs):
    config = GEARConfig(vocab_size=vocab_size, num_classes=num_classes, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=image_size, downsample_factor=downsample_factor,
                        class_dropout_prob=class_dropout_prob, **kwargs)
    model = GEARForCausalImageLM(config).eval()
    with torch.no_grad():  # the LM head starts at zero (uniform logits); make labels and samples matter
        model.output.weight.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(1234)
    return tiny_tokenizer(), tiny_ar()


@pytest.fixture()
def pipe(components):
    vq_model, transformer = components
    pipe = GEARPipeline(vq_model=vq_model, transformer=transformer, id2label=NAMES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_output_types_and_shapes(pipe):
    out = pipe([1, 2], generator=gens(0, 1))
    assert isinstance(out, ImagePipelineOutput)
    assert len(out.images) == 2 and all(isinstance(im, PIL.Image.Image) for im in out.images)
    assert out.images[0].size == (IMAGE_SIZE, IMAGE_SIZE) and out.images[0].mode == "RGB"

    np_images = pipe([1, 2], generator=gens(0, 1), output_type="np").images
    assert np_images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np_images.dtype == np.float32
    assert np_images.min() >= 0 and np_images.max() <= 1

    pt_images = pipe([1, 2], generator=gens(0, 1), output_type="pt").images
    assert pt_images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and pt_images.dtype == torch.float32
    np.testing.assert_allclose(pt_images.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)

    tokens = pipe([1, 2], generator=gens(0, 1), output_type="latent").images
    assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < CODEBOOK

    # pil = the official uint8 rounding of the decoded (clamped) tokens; np is the same image in float
    with torch.no_grad():
        decoded = pipe.vq_model.decode(tokens).clamp(-1, 1)
    assert np.array_equal(np.stack([np.asarray(im) for im in out.images]), to_uint8(decoded).numpy())
    np.testing.assert_allclose(np_images, (decoded.permute(0, 2, 3, 1).numpy() + 1) / 2, atol=1e-6)


def test_to_uint8_matches_official_formula():
    x = torch.tensor([-1.0, -0.999, 0.0, 1 / 255, 0.5, 1.0]).view(1, 1, 1, -1)
    expected = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)  # official: truncation after +128
    assert torch.equal(to_uint8(x).permute(0, 3, 1, 2), expected)
    assert to_uint8(x).flatten().tolist()[0] == 0 and to_uint8(x).flatten().tolist()[-1] == 255


def test_return_tuple_and_sampling_record(pipe):
    (images,) = pipe(3, generator=gens(0), output_type="latent", return_dict=False)
    assert images.shape == (1, 4, 4)
    out = pipe(3, preset="fid", generator=gens(0), output_type="latent")
    assert out.sampling_config.preset == "fid" and out.sampling_config.guidance_scale == 1.0
    assert out.sampling_config.top_k == 0 and out.sampling_config.top_p == 1.0
    guided = pipe(3, guidance_scale=2.5, top_k=10, generator=gens(0), output_type="latent")
    assert guided.sampling_config.guidance_scale == 2.5 and guided.sampling_config.top_k == 10


def test_label_names_ids_and_num_images_per_prompt(pipe):
    out = pipe(["alias2", 3, "CLASS5, Alias5"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    assert out.class_labels.tolist() == [2, 2, 3, 3, 5, 5]
    assert out.images.shape == (6, 4, 4)
    assert pipe.get_label_ids(["class7", " Alias1 "]) == [7, 1]
    assert pipe.id2label[4] == "class4, alias4"
    assert pipe("class9", output_type="latent").class_labels.tolist() == [9]
    assert pipe(torch.tensor([4, 6]), output_type="latent").class_labels.tolist() == [4, 6]
    assert pipe(np.int64(8), output_type="latent").class_labels.tolist() == [8]


def test_id2label_falls_back_to_transformer_config(components):
    vq_model, transformer = components
    pipe = GEARPipeline(vq_model=vq_model, transformer=transformer)
    assert pipe.id2label == {}  # transformers' placeholder {0: "LABEL_0", 1: "LABEL_1"} is not a name table
    with pytest.raises(ValueError, match="no class names"):
        pipe("goldfish")
    ar = tiny_ar(id2label={1: "goldfish", 2: "great white shark"})
    ar.load_state_dict(transformer.state_dict())
    pipe = GEARPipeline(vq_model=vq_model, transformer=ar)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids("Great White Shark") == [2]
    assert pipe("goldfish", output_type="latent").class_labels.tolist() == [1]


def test_imagenet_names_and_id2label_setter(components, tmp_path):
    vq_model, _ = components
    pipe = GEARPipeline(vq_model=vq_model, transformer=tiny_ar(num_classes=1000), id2label="imagenet-1k")
    assert pipe.get_label_ids(["golden retriever", "Tinca tinca", "goldfish"]) == [207, 0, 1]
    with pytest.raises(ValueError, match=r"ambiguous: classes \[134, 517\]"):
        pipe.get_label_ids("crane")
    pipe.id2label = {0: "zero", 999: "last"}
    assert pipe.id2label == {0: "zero", 999: "last"} and pipe.get_label_ids("LAST") == [999]
    pipe.save_pretrained(tmp_path)
    assert GEARPipeline.from_pretrained(tmp_path).id2label == {0: "zero", 999: "last"}
    with pytest.raises(ValueError, match="Unknown label set"):
        pipe.id2label = "imagenet-21k"
    with pytest.raises(ValueError, match="outside"):
        GEARPipeline(vq_model=vq_model, transformer=components[1], id2label="imagenet-1k")


def test_every_unique_imagenet_name_selects_its_class(components):
    from gear_hf.pipelines.class_labels import imagenet_id2label

    names = imagenet_id2label()
    counts = {}
    for name in names.values():
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    unique = {i: name for i, name in names.items() if counts[name.lower()] == 1}
    pipe = GEARPipeline(vq_model=components[0], transformer=tiny_ar(num_classes=1000), id2label="imagenet-1k")
    assert pipe.get_label_ids(list(unique.values())) == list(unique)
    # e.g. 474 "cardigan" is also a synonym of 264 "Cardigan, Cardigan Welsh corgi"; both full names "crane" stay
    # ambiguous
    assert pipe.get_label_ids("cardigan") == [474] and {134, 517} <= set(names) - set(unique)
    label2id = pipe.label2id  # consistent with get_label_ids
    assert all(label2id[name.lower()] == i for i, name in unique.items())
    assert label2id["cardigan welsh corgi"] == 264 and label2id["crane"] == 134
    with pytest.raises(ValueError, match=r"ambiguous: classes \[134, 517\]"):
        pipe(class_labels=["goldfish", "crane"])


def test_progress_bar_counts_every_decoded_token(pipe, monkeypatch):
    steps = []

    class Recorder:
        def __init__(self, total):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            steps.append(n)

    monkeypatch.setattr(pipe, "progress_bar", lambda iterable=None, total=None: Recorder(total))
    pipe([0, 1], guidance_scale=2.0, generator=gens(0, 1), output_type="latent")
    assert len(steps) == pipe.transformer.config.num_image_tokens == 16


def test_per_image_generators_do_not_depend_on_the_batch(pipe):
    batch = pipe([5, 1, 7], guidance_scale=2.0, generator=gens(10, 11, 12), output_type="latent").images
    alone = pipe([1], guidance_scale=2.0, generator=gens(11), output_type="latent").images
    assert torch.equal(batch[1], alone[0])
    reordered = pipe([7, 5], guidance_scale=2.0, generator=gens(12, 10), output_type="latent").images
    assert torch.equal(reordered[0], batch[2]) and torch.equal(reordered[1], batch[0])
    # images too (decoding identical tokens; float kernels may differ in the last bit across batch sizes)
    batch_np = pipe([5, 1, 7], guidance_scale=2.0, generator=gens(10, 11, 12), output_type="np").images
    alone_np = pipe([1], guidance_scale=2.0, generator=gens(11), output_type="np").images
    np.testing.assert_allclose(batch_np[1], alone_np[0], atol=1e-5)
    # a different seed gives a different sample
    other = pipe([1], guidance_scale=2.0, generator=gens(99), output_type="latent").images
    assert not torch.equal(other[0], alone[0])


def test_single_generator_is_reproducible(pipe):
    a = pipe([0, 1, 2], generator=torch.Generator().manual_seed(3), output_type="latent").images
    b = pipe([0, 1, 2], generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(a, b)


def test_save_load_round_trip_is_bit_identical(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "GEARPipeline"
    assert index["vq_model"] == ["gear_hf.models.modeling_gear_tokenizer", "GEARTokenizerModel"]
    assert index["transformer"] == ["gear_hf.models.modeling_gear_ar", "GEARForCausalImageLM"]
    assert index["id2label"]["3"] == "class3, alias3"
    for name in ("vq_model/config.json", "vq_model/model.safetensors", "transformer/config.json",
                 "transformer/model.safetensors"):
        assert (tmp_path / name).is_file(), name

    loaded = GEARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == pipe.id2label
    kwargs = dict(class_labels=[4, "alias6"], guidance_scale=1.5, top_k=20)
    before = pipe(**kwargs, generator=gens(5, 6), output_type="np").images
    after = loaded(**kwargs, generator=gens(5, 6), output_type="np").images
    assert np.array_equal(before, after)
    pil_before = pipe(**kwargs, generator=gens(5, 6)).images
    pil_after = loaded(**kwargs, generator=gens(5, 6)).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil_before, pil_after))


def test_component_mismatch_errors(components):
    vq_model, transformer = components
    with pytest.raises(ValueError, match="codebook_size=64 but the AR generator predicts vocab_size=128"):
        GEARPipeline(vq_model=vq_model, transformer=tiny_ar(vocab_size=128))
    with pytest.raises(ValueError, match=r"samples a 8x8 token grid .* tokenizer's grid is 4x4"):
        GEARPipeline(vq_model=vq_model, transformer=tiny_ar(image_size=32))
    with pytest.raises(ValueError, match="downsample_factor"):
        GEARPipeline(vq_model=vq_model, transformer=tiny_ar(image_size=32, downsample_factor=8))
    with pytest.raises(TypeError, match="vq_model must be a GEARTokenizerModel"):
        GEARPipeline(vq_model=transformer, transformer=vq_model)
    with pytest.raises(ValueError, match="outside"):
        GEARPipeline(vq_model=vq_model, transformer=transformer, id2label={10: "too far"})
    with pytest.raises(ValueError, match="class-conditional: it takes no text_encoder"):
        GEARPipeline(vq_model=vq_model, transformer=transformer, text_encoder=torch.nn.Linear(1, 1))
    check_components_compatible(vq_model, transformer)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(class_labels="gold fish"), ValueError, "Unknown class name 'gold fish'"),
        (dict(class_labels="clas3"), ValueError, "Did you mean 'class3'"),
        (dict(class_labels=[1, 10]), ValueError, r"Class id 10 is out of range.*\[0, 9\]"),
        (dict(class_labels=-1), ValueError, "out of range"),
        (dict(class_labels=[True]), TypeError, "int id or a class name"),
        (dict(class_labels=[1.5]), TypeError, "int id or a class name"),
        (dict(class_labels=torch.tensor([0.5])), ValueError, "integer class ids"),
        (dict(class_labels=torch.tensor([True])), ValueError, "integers"),
        (dict(class_labels=torch.zeros(2, 2, dtype=torch.long)), ValueError, "0-D or 1-D"),
        (dict(class_labels=[]), ValueError, "empty"),
        (dict(class_labels={1: 2}), TypeError, "class_labels must be"),
        (dict(class_labels=[1, 2], generator=gens(0)), ValueError, "1 generators for 2 images"),
        (dict(class_labels=[1], num_images_per_prompt=3, generator=gens(0, 1)), ValueError, "one generator per image"),
        (dict(class_labels=1, generator=0), TypeError, "generator must be"),
        (dict(class_labels=1, output_type="numpy"), ValueError, "output_type must be one of"),
        (dict(class_labels=1, num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(class_labels=1, guidance_scale=0.5), ValueError, "guidance_scale must be >= 1"),
        (dict(class_labels=1, top_p=0.0), ValueError, "top_p"),
        (dict(class_labels=1, top_k=-1), ValueError, "top_k"),
        (dict(class_labels=1, temperature=0.0), ValueError, "do_sample=False"),
        (dict(class_labels=1, guidance_interval=-3), ValueError, "guidance_interval"),
        (dict(class_labels=1, preset="best"), ValueError, "Unknown sampling preset"),
        (dict(prompt="a photo of a cat"), ValueError, "Prompts need a text-to-image pipeline"),
        (dict(prompt_embeds=torch.zeros(1, 4, 8)), ValueError, "class-conditional .* text-to-image pipelines only"),
        (dict(prompt=1, class_labels=2), ValueError, "positionally or as class_labels"),
        (dict(prompt=1, class_labels=[2, 3]), ValueError, r"Pass the classes once: positionally or as class_labels"),
        (dict(class_labels=1, negative_prompt="blurry"), ValueError, r"class-conditional \(no text encoder\)"),
        (dict(class_labels=1, negative_prompt_embeds=torch.zeros(1, 4, 8)), ValueError, r"\(no text encoder\)"),
        (dict(class_labels=1, prompt_attention_mask=torch.ones(1, 4)), ValueError, r"\(no text encoder\)"),
        (dict(class_labels=1, negative_prompt_attention_mask=torch.ones(1, 4)), ValueError, r"\(no text encoder\)"),
    ],
)
def test_bad_inputs_fail_before_sampling(pipe, monkeypatch, kwargs, error, match):
    def must_not_sample(*args, **kw):
        raise AssertionError("sampling started before the inputs were validated")

    monkeypatch.setattr(pipe.transformer, "generate_images", must_not_sample)
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_ambiguous_name_and_guidance_without_null_class(components):
    vq_model, transformer = components
    # ImageNet has two "crane"s (the bird and the machine): a name shared by classes must not pick one silently
    pipe = GEARPipeline(vq_model=vq_model, transformer=transformer, id2label={3: "crane", 5: "crane"})
    with pytest.raises(ValueError, match=r"ambiguous: classes \[3, 5\]"):
        pipe("crane")
    pipe.id2label = {3: "crane, grus", 5: "crane, derrick"}  # a synonym shared by two classes
    with pytest.raises(ValueError, match=r"ambiguous: classes \[3, 5\]"):
        pipe("crane")
    pipe.id2label = {3: "crane", 5: "crane, derrick"}  # a class's full name wins over another's synonym
    assert pipe.get_label_ids(["crane", "derrick", "Crane, Derrick"]) == [3, 5, 5]
    no_null = tiny_ar(class_dropout_prob=0.0)
    pipe = GEARPipeline(vq_model=vq_model, transformer=no_null)
    with pytest.raises(ValueError, match="null class"):
        pipe(1, guidance_scale=2.0)


def test_greedy_decoding_ignores_generators(pipe):
    a = pipe([2, 2], do_sample=False, generator=gens(0, 1), output_type="latent").images
    assert torch.equal(a[0], a[1])


# ---------------------------------------------------------------------------------------------- text-to-image
@pytest.fixture(scope="module")
def t2i_pipe(components):
    from text_fixtures import byte_level_tokenizer, tiny_text_encoder

    vq_model, _ = components
    tokenizer = byte_level_tokenizer()
    transformer = tiny_ar(condition_type="text", caption_dim=32, text_length=8)
    pipe = GEARPipeline(vq_model=vq_model, transformer=transformer, text_encoder=tiny_text_encoder(tokenizer),
                        tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an int >= 1, got 0"),
        (dict(num_images_per_prompt=1.5), ValueError, "num_images_per_prompt must be an int >= 1, got 1.5"),
        (dict(output_type="numpy"), ValueError, "output_type must be one of"),
        (dict(generator=gens(0, 1)), ValueError, "2 generators for 1 images"),
        (dict(top_p=0.0), ValueError, "top_p"),
    ],
)
def test_text_to_image_bad_inputs_fail_before_encoding(t2i_pipe, kwargs, error, match):
    forwards = []
    hook = t2i_pipe.text_encoder.register_forward_pre_hook(lambda module, args: forwards.append(module))
    try:
        with pytest.raises(error, match=match):
            t2i_pipe("a red car", guidance_scale=3.0, **kwargs)
    finally:
        hook.remove()
    assert forwards == []  # neither the prompt nor the "" negative was encoded


def test_text_to_image_resolves_sampling_settings_once(t2i_pipe):
    with pytest.warns(UserWarning) as record:
        out = t2i_pipe("a red car", preset="demo", generator=gens(0), output_type="latent")
    clamps = [w for w in record if "exceeds the codebook size" in str(w.message)]
    assert len(clamps) == 1 and out.sampling_config.top_k == CODEBOOK
    assert out.prompts == ["a red car"] and out.images.shape == (1, 4, 4)
