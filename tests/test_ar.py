"""GEARForCausalImageLM: forward contract, KV cache, sampling, serialisation, conversion."""

import pytest
import torch

import gear_hf
from gear_hf import GEARConfig, GEARForCausalImageLM
from gear_hf.conversion import (
    CheckpointMismatchError,
    ar_config_from_state_dict,
    load_ar_from_official_checkpoint,
    select_ar_state_dict,
)
from gear_hf.sampling import SAMPLING_PRESETS, TokenPicker, filter_top_k_top_p, resolve_sampling_config

K, CLASSES, GRID = 64, 10, 4
L = GRID * GRID


def tiny_config(**overrides):
    sizes = dict(vocab_size=K, num_classes=CLASSES, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=GRID * 16, downsample_factor=16)
    return GEARConfig(**{**sizes, **overrides})


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GEARForCausalImageLM(tiny_config(**overrides))
    with torch.no_grad():  # the head is zero-initialised: give every weight O(1) effect
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, K, (3, L), generator=g), torch.tensor([0, 5, CLASSES])


# ---------------------------------------------------------------------------------------------- config / init


def test_config_defaults_and_presets():
    config = GEARConfig.from_preset("LlamaGen-B", vocab_size=K)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 2048 and config.grid_size == 16 and config.num_image_tokens == 256
    assert GEARConfig.from_preset("LlamaGen-L").intermediate_size == 2816
    assert GEARConfig.from_preset("LlamaGen-XXXL").intermediate_size == 6912
    assert config.num_class_embeddings == 1001 and config.null_class_id == 1000
    assert tiny_config(class_dropout_prob=0.0).num_class_embeddings == CLASSES


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_attention_heads": 3}, "divisible by num_attention_heads"),
        ({"image_size": 70}, "divisible by downsample_factor"),
        ({"num_attention_heads": 32}, "multiple of 4"),
        ({"cls_token_num": 2}, "cls_token_num"),
        ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)
    with pytest.raises(ValueError, match="Unknown LlamaGen preset"):
        GEARConfig.from_preset("GPT-B")


def test_init_and_state_dict_keys():
    model = GEARForCausalImageLM(tiny_config())
    assert torch.count_nonzero(model.output.weight) == 0
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.003
    keys = set(model.state_dict())
    assert {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight",
            "layers.1.attention.wqkv.weight", "layers.1.attention.wo.weight", "layers.1.feed_forward.w1.weight",
            "layers.1.feed_forward.w2.weight", "layers.1.feed_forward.w3.weight", "layers.1.attention_norm.weight",
            "layers.1.ffn_norm.weight"} <= keys
    assert len(keys) == 4 + 2 * 7
    assert model.cls_embedding.embedding_table.weight.shape == (CLASSES + 1, 64)


# ---------------------------------------------------------------------------------------------- forward contract


def test_logits_shape_and_loss(model, batch):
    tokens, labels = batch
    out = model(tokens[:, :-1], labels, labels=tokens)
    assert out.logits.shape == (3, L, K) and out.logits.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten())
    assert torch.allclose(out.loss, expected)


def test_kv_cache_matches_full_forward_at_every_position(model, batch):
    tokens, labels = batch
    with torch.no_grad():
        full = model(tokens[:, :-1], labels).logits
        cache = model.allocate_kv_cache(3)
        steps = [model(class_labels=labels, cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(L - 1)]
        # A multi-token chunk appended to a filled cache (bottom-right causal mask).
        chunked = model.allocate_kv_cache(3)
        first = model(tokens[:, :5], labels, cache=chunked).logits
        rest = model(tokens[:, 5:-1], cache=chunked).logits
    assert cache.seq_length == L
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    assert (torch.cat([first, rest], dim=1) - full).abs().max() <= 1e-5


def test_cache_naming_of_transformers_5_24(model, batch):
    """The cache is `cache=` in and `.cache` out; the pre-5.24 `past_key_values=` keyword still works."""
    tokens, labels = batch
    with torch.no_grad():
        cache = model.allocate_kv_cache(3)
        out = model(class_labels=labels, cache=cache)
        assert out.cache is cache and cache.seq_length == 1
        legacy = model.allocate_kv_cache(3)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(class_labels=labels, past_key_values=legacy)
    assert old.cache is legacy and legacy.seq_length == 1
    assert torch.equal(old.logits, out.logits)


def test_soft_one_hot_equals_hard(model, batch):
    tokens, labels = batch
    one_hot = torch.nn.functional.one_hot(tokens[:, :-1], K).float()
    with torch.no_grad():
        hard = model(tokens[:, :-1], labels).logits
        soft = model(input_probs=one_hot, class_labels=labels).logits
    assert (hard - soft).abs().max() <= 1e-5


def test_soft_logits_equal_probs(model, batch):
    """input_logits + temperature = input_probs softmax(A / τ), value and gradient (the lean soft read-out)."""
    _, labels = batch
    logits = torch.randn(3, L - 1, K, requires_grad=True)
    lean = model(input_logits=logits, temperature=0.1, class_labels=labels, stop_at_layer=1).last_hidden_state
    dense = model(input_probs=torch.softmax(logits / 0.1, -1), class_labels=labels,
                  stop_at_layer=1).last_hidden_state
    assert (lean - dense).abs().max() <= 1e-5
    (grad_lean,) = torch.autograd.grad(lean.square().sum(), logits)
    (grad_dense,) = torch.autograd.grad(dense.square().sum(), logits)
    assert (grad_lean - grad_dense).abs().max() <= 1e-5


def test_hidden_states_convention(model, batch):
    tokens, labels = batch
    with torch.no_grad():
        out = model(tokens[:, :-1], labels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    class_token = model.cls_embedding.embedding_table(labels)[:, None]
    embeddings = torch.cat([class_token, model.tok_embeddings(tokens[:, :-1])], dim=1)
    assert torch.equal(out.hidden_states[0], embeddings)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert torch.equal(model.output(model.norm(out.hidden_states[-1])), out.logits)


def test_stop_at_layer_runs_no_later_block(model, batch):
    tokens, labels = batch
    called = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: called.append(name))
             for name, m in [("layer0", model.layers[0]), ("layer1", model.layers[1]), ("norm", model.norm),
                             ("output", model.output)]]
    try:
        with torch.no_grad():
            stopped = model(tokens[:, :-1], labels, stop_at_layer=1, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    assert called == ["layer0"]
    assert stopped.logits is None and len(stopped.hidden_states) == 2
    with torch.no_grad():
        full = model(tokens[:, :-1], labels, output_hidden_states=True)
    assert torch.equal(stopped.last_hidden_state, full.hidden_states[1])
    assert torch.equal(stopped.hidden_states[1], full.hidden_states[1])


def test_stop_at_layer_gradients_reach_soft_inputs(model, batch):
    _, labels = batch
    probs = torch.softmax(torch.randn(3, L - 1, K), -1).requires_grad_()
    model(input_probs=probs, class_labels=labels, stop_at_layer=1).last_hidden_state.square().mean().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_class_dropout_in_training_only():
    model = random_model(class_dropout_prob=0.99, token_dropout_prob=0.0, resid_dropout_prob=0.0,
                         ffn_dropout_prob=0.0)
    labels = torch.arange(8) % CLASSES
    null_row = model.cls_embedding.embedding_table.weight[CLASSES]
    model.train()
    first = model(class_labels=labels, output_hidden_states=True).hidden_states[0][:, 0]
    assert (first == null_row).all(-1).sum() >= 6
    model.eval()
    first = model(class_labels=labels, output_hidden_states=True).hidden_states[0][:, 0]
    assert torch.equal(first, model.cls_embedding.embedding_table(labels))


def test_gradient_checkpointing_same_grads(batch):
    tokens, labels = batch
    grads = []
    for checkpointing in (False, True):
        model = random_model(token_dropout_prob=0.0, resid_dropout_prob=0.0, ffn_dropout_prob=0.0,
                             class_dropout_prob=0.1).train()
        model.cls_embedding.dropout_prob = 0.0
        if checkpointing:
            model.activation_checkpointing_enable()
        model(tokens[:, :-1], labels, labels=tokens).loss.backward()
        grads.append(model.layers[0].attention.wqkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_forward(batch):
    tokens, labels = batch
    model = random_model().to(torch.bfloat16)
    with torch.no_grad():
        out = model(tokens[:, :-1], labels)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_forward_errors(model, batch):
    tokens, labels = batch
    probs = torch.softmax(torch.randn(3, L - 1, K), -1)
    with pytest.raises(ValueError, match="not several"):
        model(tokens[:, :-1], labels, input_probs=probs)
    with pytest.raises(ValueError, match="need their temperature"):
        model(input_logits=probs, class_labels=labels)
    with pytest.raises(ValueError, match="class_labels are required"):
        model(tokens[:, :-1])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\]"):
        model(tokens[:, :-1], torch.tensor([0, 1, CLASSES + 1]))
    with pytest.raises(ValueError, match="class_labels must lie"):
        model(tokens[:, :-1], torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="no null class"):
        random_model(class_dropout_prob=0.0)(tokens[:, :-1], torch.tensor([0, 1, CLASSES]))
    for bad in (0, 3):
        with pytest.raises(ValueError, match="stop_at_layer must be in"):
            model(tokens[:, :-1], labels, stop_at_layer=bad)
    with pytest.raises(ValueError, match="input_probs must have shape"):
        model(input_probs=probs[..., :-1], class_labels=labels)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.cat([tokens, tokens[:, :1]], 1), labels)
    cache = model.allocate_kv_cache(3)
    model(class_labels=labels, cache=cache)
    with pytest.raises(ValueError, match="already holds"):
        model(tokens[:, :1], labels, cache=cache)


# ---------------------------------------------------------------------------------------------- sampling


def test_cached_sampling_equals_uncached(model):
    labels = torch.tensor([1, 4])
    for kwargs in ({"guidance_scale": 3.0}, {"guidance_scale": 2.0, "guidance_interval": 2, "top_k": 8},
                   {"top_p": 0.8, "temperature": 0.7}):
        a = model.generate_images(labels, generator=torch.Generator().manual_seed(3), **kwargs)
        b = model.generate_images(labels, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
        assert torch.equal(a, b), kwargs
    assert a.shape == (2, GRID, GRID) and a.dtype == torch.long


def test_batched_cfg_equals_per_sample(model):
    labels = torch.tensor([1, 4, 7])
    batched = model.generate_images(labels, guidance_scale=4.0, do_sample=False)
    single = torch.cat([model.generate_images(labels[i : i + 1], guidance_scale=4.0, do_sample=False)
                        for i in range(3)])
    assert torch.equal(batched, single)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    batched = model.generate_images(labels, guidance_scale=4.0, generator=gens())
    single = torch.cat([model.generate_images(labels[i : i + 1], guidance_scale=4.0, generator=[g])
                        for i, g in enumerate(gens())])
    assert torch.equal(batched, single)


def test_per_sample_generators_independent_of_batch(model):
    seeds = [5, 6, 7]
    batch3 = model.generate_images(torch.tensor([2, 2, 2]), guidance_scale=2.0, top_k=16,
                                   generator=[torch.Generator().manual_seed(s) for s in seeds])
    batch1 = model.generate_images(torch.tensor([2]), guidance_scale=2.0, top_k=16,
                                   generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(batch3[1], batch1[0])
    assert not torch.equal(batch3[0], batch3[1])  # different seeds, different images
    again = model.generate_images(torch.tensor([2]), guidance_scale=2.0, top_k=16,
                                  generator=torch.Generator().manual_seed(6))
    assert torch.equal(again, batch1)  # one generator == a list of one


def test_sampling_restores_training_mode(model):
    model.train()
    model.generate_images(torch.tensor([1]), do_sample=False)
    assert model.training
    model.eval()


def test_presets_and_overrides(model):
    with pytest.warns(UserWarning, match="clamped to 64"):
        grid = model.generate_images(torch.tensor([3]), preset="demo", temperature=0.5,
                                     generator=torch.Generator().manual_seed(0))
    s = grid.sampling_config
    assert (s.preset, s.guidance_scale, s.top_k, s.temperature, s.top_p) == ("demo", 4.0, K, 0.5, 1.0)
    assert SAMPLING_PRESETS["fid"].guidance_scale == 1.0 and SAMPLING_PRESETS["fid"].top_k == 0
    fid = resolve_sampling_config("fid", vocab_size=16384, guidance_scale=1.5)
    assert fid.guidance_scale == 1.5 and fid.to_dict()["preset"] == "fid"
    assert resolve_sampling_config(None).guidance_interval is None
    assert resolve_sampling_config(None, guidance_interval=-1).guidance_interval is None
    assert [resolve_sampling_config(None).is_guided(t) for t in range(5)] == [False] * 5
    guided = resolve_sampling_config(guidance_scale=2.0, guidance_interval=1)
    assert [guided.is_guided(t) for t in range(4)] == [True, True, True, False]  # official cfg_interval


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": -1}, "top_k must be"),
        ({"top_k": K + 1}, "exceeds the codebook size"),
        ({"top_p": 0.0}, "top_p must be"),
        ({"top_p": 1.5}, "top_p must be"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"guidance_scale": 0.5}, "guidance_scale must be >= 1"),
        ({"guidance_interval": -3}, "guidance_interval"),
        ({"preset": "best"}, "Unknown sampling preset"),
    ],
)
def test_sampling_argument_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate_images(torch.tensor([1]), **kwargs)


def test_sampling_input_errors(model):
    with pytest.raises(ValueError, match="class_labels must lie"):
        model.generate_images(torch.tensor([CLASSES + 1]))
    with pytest.raises(ValueError, match="list of 2"):
        model.generate_images(torch.tensor([1, 2]), generator=[torch.Generator()])
    with pytest.raises(ValueError, match="null class"):
        random_model(class_dropout_prob=0.0).generate_images(torch.tensor([1]), guidance_scale=2.0)
    # temperature is irrelevant for greedy decoding
    model.generate_images(torch.tensor([1]), do_sample=False, temperature=0.0)
    with pytest.raises(NotImplementedError, match="generate_images"):
        model.generate(torch.tensor([[1]]))


def test_top_k_keeps_ties_and_top_p_keeps_crossing_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    kept = filter_top_k_top_p(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_k_top_p(probs.log(), top_p=0.6).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.6, the crossing token (0.3) is kept
    kept = filter_top_k_top_p(probs.log(), top_p=0.4).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_gumbel_sampling_matches_softmax():
    settings = resolve_sampling_config(None, temperature=2.0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    pick = TokenPicker(settings, 40000, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    counts = torch.bincount(pick(logits.expand(40000, 4)), minlength=4).float() / 40000
    assert torch.allclose(counts, torch.softmax(logits / 2.0, -1), atol=0.01)


# ---------------------------------------------------------------------------------------------- serialisation


def test_save_from_pretrained_round_trip(model, tmp_path, batch):
    tokens, labels = batch
    model.save_pretrained(tmp_path)
    loaded = GEARForCausalImageLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(model(tokens[:, :-1], labels).logits, loaded(tokens[:, :-1], labels).logits)
    from transformers import AutoConfig, AutoModelForCausalLM

    assert type(AutoConfig.from_pretrained(tmp_path)) is GEARConfig
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is GEARForCausalImageLM and auto.config.grid_size == GRID
    assert gear_hf.GEARForCausalImageLM is GEARForCausalImageLM


# ---------------------------------------------------------------------------------------------- conversion


def test_select_ar_state_dict_layouts(model):
    sd = model.state_dict()
    live = {k: v + 1 for k, v in sd.items()}
    state, desc = select_ar_state_dict({"ar": live, "ema": sd, "steps": 3}, use_ema=True)
    assert "ema" in desc and torch.equal(state["norm.weight"], sd["norm.weight"])
    state, desc = select_ar_state_dict({"ar": live, "ema": sd}, use_ema=False)
    assert "'ar'" in desc and torch.equal(state["norm.weight"], live["norm.weight"])
    state, desc = select_ar_state_dict({"ar": live}, use_ema=True)
    assert "no 'ema'" in desc
    prefixed = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    prefixed["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    state, desc = select_ar_state_dict({"model": prefixed}, use_ema=True)
    assert set(state) == set(sd) and "LlamaGen" in desc and "KV cache" in desc
    state, desc = select_ar_state_dict(sd, use_ema=False)
    assert desc == "bare state dict"
    with pytest.raises(CheckpointMismatchError, match="Unrecognised"):
        select_ar_state_dict({"vq": {"a": 1}}, use_ema=True)


def test_conversion_is_strict(model):
    sd = dict(model.state_dict())
    converted, _ = load_ar_from_official_checkpoint({"ema": sd}, image_size=64, num_attention_heads=4)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in sd.items())
    broken = dict(sd)
    del broken["layers.1.ffn_norm.weight"]
    broken["layers.1.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError) as err:
        load_ar_from_official_checkpoint({"ar": broken}, image_size=64, num_attention_heads=4)
    assert "layers.1.ffn_norm.weight" in str(err.value) and "layers.1.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="cannot be read from the weights"):
        ar_config_from_state_dict(sd, image_size=64)
    with pytest.raises(CheckpointMismatchError, match="not LlamaGen-B"):
        ar_config_from_state_dict(sd, image_size=64, preset="LlamaGen-B")
    config = ar_config_from_state_dict(sd, image_size=64, num_attention_heads=4)
    assert (config.vocab_size, config.num_classes, config.hidden_size, config.num_hidden_layers,
            config.intermediate_size) == (K, CLASSES, 64, 2, model.config.intermediate_size)


def test_convert_cli(model, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    live = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"ar": live, "ema": model.state_dict()}, tmp_path / "ckpt.pt")
    cli.main(["ar", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "ema"),
              "--image-size", "64", "--num-heads", "4"])
    cli.main(["ar", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "live"),
              "--image-size", "64", "--num-heads", "4", "--no-ema"])
    ema = GEARForCausalImageLM.from_pretrained(tmp_path / "ema")
    assert torch.equal(ema.output.weight, model.output.weight) and ema.config.grid_size == GRID
    assert torch.equal(GEARForCausalImageLM.from_pretrained(tmp_path / "live").output.weight, live["output.weight"])
    with pytest.raises(SystemExit):  # --ar-model and --num-heads are mutually exclusive
        cli.main(["ar", "--checkpoint", "x.pt", "--output", "o", "--image-size", "64", "--num-heads", "4",
                  "--ar-model", "LlamaGen-B"])
