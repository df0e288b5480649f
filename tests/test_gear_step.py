"""GEAR's routing claim (paper §3.2, Algorithm 1; official_code_spec.md §6.2) as tests of the real training step.

One stage-1 step reads the assignment A out twice. Hard tokens argmax A feed the AR (NTP + REPA) and update only
the AR and projector; the soft read-out softmax(A/τ) goes through the AR's own embedding table and AR blocks
1..ℓ only (AR frozen, eval mode), and its REPA loss updates only the tokenizer. The discriminator learns on
sg(x̂) and the generator's GAN term leaves the discriminator alone. Every test below fails when that routing
breaks (for instance when `frozen(...)` is dropped, the hard branch is fed `input_probs`, π is detached or the
soft pass runs past block ℓ).

How: `gear_step` / `tokenizer_step` / `ar_step` run unmodified on tiny in-memory models (16 px images, an 8×8
token grid, K = 64, a 3-block AR with ℓ = 2, a random 1-layer DINOv2 teacher, LPIPS weight 0). Each trainable
module gets a `Probe`: a real `ModuleUpdate` that, when the step calls it, first records which parameter groups
(encoder, codebook, decoder, AR, AR embedding table E, projector, discriminator) the update's loss is connected to
in its autograd graph, which of them get a non-zero gradient, and every group's values and `.grad` before and
after the update; then it does the normal backward / clip / step / zero-grad. Forward hooks on the AR show which
blocks ran, in which mode, in which phase of the step.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from text_fixtures import byte_level_tokenizer, tiny_text_encoder

from gear_hf.models.configuration_gear_ar import GEARConfig
from gear_hf.models.configuration_gear_tokenizer import GEARTokenizerConfig
from gear_hf.models.modeling_gear_ar import GEARForCausalImageLM
from gear_hf.models.modeling_gear_tokenizer import GEARTokenizerModel
from gear_hf.training.alignment import DINOv2Teacher, ProjectorBank
from gear_hf.training.config import TrainingConfig
from gear_hf.training.ema import EMA
from gear_hf.training.gear_step import (
    GEARModules,
    ModuleUpdate,
    ar_step,
    batch_condition,
    gear_step,
    tokenizer_step,
)
from gear_hf.training.losses import PatchGANDiscriminator, TokenizerLoss
from gear_hf.text_encoder import TextConditioner

QUANTIZERS = ("vq", "lfq", "ibq")
IMAGE_SIZE, K, NUM_CLASSES, BATCH = 16, 64, 10, 2
NUM_LAYERS, ALIGN_LAYER = 3, 2  # the soft pass must run blocks 1..2 and never block 3
GRID = IMAGE_SIZE // 2  # channel_multipliers [1, 2] → downsample factor 2 → 8×8 tokens
TOKENIZER_GROUPS = ("encoder", "codebook", "decoder")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny models, probes
# ---------------------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _nonzero(tensors) -> bool:
    return any(t is not None and bool(t.detach().abs().sum() > 0) for t in tensors)


def _leaves(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of `loss` connects to, found by walking
    `grad_fn.next_functions` (no saved tensors needed, so this also works on a graph that was already used)."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            found.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


@dataclasses.dataclass
class Probe(ModuleUpdate):
    """A real `ModuleUpdate` that first records, per call,

    * `connected[g]`: the loss's graph reaches a parameter of group g at all (structural; what `frozen` and
      integer tokens must prevent),
    * `grad[g]`: the loss's gradient for group g is non-zero somewhere (numerical),
    * `grads_before` / `grads_after`: group g holds a non-zero `.grad` before / after the update,
    * `moved[g]`: the update changed a parameter of group g (plus the `before` / `after` values),

    and otherwise does exactly what `ModuleUpdate` does. If the update's own backward fails (e.g. it runs into the
    already-freed graph of a module updated earlier in the step), that is reported as an AssertionError naming
    the groups the loss was connected to."""

    name: str = ""
    groups: dict = dataclasses.field(default_factory=dict)  # group name → list of parameters
    timeline: list = dataclasses.field(default_factory=list)  # shared with the other probes and the AR hooks
    records: list = dataclasses.field(default_factory=list)

    def _state(self):
        return {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}

    def _grads(self):
        return {g: _nonzero([p.grad for p in ps]) for g, ps in self.groups.items()}

    def __call__(self, loss, parameters=None):
        self.timeline.append(("update", self.name))
        leaves = _leaves(loss) if loss.requires_grad else set()
        connected = {g: any(id(p) in leaves for p in ps) for g, ps in self.groups.items()}
        grad = {}
        for g, ps in self.groups.items():
            inputs = [p for p in ps if id(p) in leaves]
            try:
                grad[g] = bool(inputs) and _nonzero(torch.autograd.grad(loss, inputs, retain_graph=True,
                                                                        allow_unused=True))
            except RuntimeError as error:  # a path into a graph that was already backpropagated / updated
                grad[g] = f"unusable path: {error}"
        before, grads_before = self._state(), self._grads()
        record = {"connected": connected, "grad": grad, "grads_before": grads_before}
        self.records.append(record)
        try:
            grad_norm = super().__call__(loss, parameters)
        except RuntimeError as error:
            reached = sorted(g for g, c in connected.items() if c)
            raise AssertionError(f"the {self.name} update's backward failed; its loss is connected to {reached}: "
                                 f"{error}") from error
        after = self._state()
        record.update(grads_after=self._grads(), before=before, after=after,
                      moved={g: any(not torch.equal(a, b) for a, b in zip(before[g], after[g])) for g in before})
        return grad_norm


def make_tokenizer(quantizer: str) -> GEARTokenizerModel:
    extra = {} if quantizer == "lfq" else {"z_channels": 32, "codebook_embed_dim": 8}  # lfq: width log2 K = 6
    config = GEARTokenizerConfig(quantizer=quantizer, codebook_size=K, image_size=IMAGE_SIZE, base_channels=32,
                                 channel_multipliers=[1, 2], num_res_blocks=1, attention_levels=[], **extra)
    return GEARTokenizerModel(config)


def make_ar(condition: str = "class") -> GEARForCausalImageLM:
    text = {"condition_type": "text", "caption_dim": 32, "text_length": 12} if condition == "text" else {}
    config = GEARConfig(vocab_size=K, num_classes=NUM_CLASSES, hidden_size=64, num_hidden_layers=NUM_LAYERS,
                        num_attention_heads=4, intermediate_size=128, image_size=IMAGE_SIZE, downsample_factor=2,
                        **text)
    ar = GEARForCausalImageLM(config)
    with torch.no_grad():  # the LM head starts at zero; give NTP a gradient path into the blocks too
        ar.output.weight.normal_(0, 0.02)
    return ar


def make_teacher() -> DINOv2Teacher:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=2, image_size=IMAGE_SIZE)
    return DINOv2Teacher(Dinov2Model(config).eval(), GRID)


def tokenizer_groups(tokenizer: GEARTokenizerModel) -> dict[str, list[nn.Parameter]]:
    """θ_tok = {E (encoder + quant_conv), C (codebook), D (post_quant_conv + decoder)}; LFQ has no codebook."""
    groups = {
        "encoder": [*tokenizer.encoder.parameters(), *tokenizer.quant_conv.parameters()],
        "codebook": list(tokenizer.quantize.parameters()),
        "decoder": [*tokenizer.post_quant_conv.parameters(), *tokenizer.decoder.parameters()],
    }
    assert sum(map(len, groups.values())) == len(list(tokenizer.parameters()))
    return groups


@dataclasses.dataclass
class Setup:
    m: GEARModules
    cfg: TrainingConfig
    batch: dict
    timeline: list
    probes: dict

    def record(self, name: str, index: int = 0) -> dict:
        return self.probes[name].records[index]


def build(accelerator, quantizer: str = "vq", *, stage: int = 1, lr: float = 1e-3, gan: bool = True,
          vq_weights: bool = True, straight_through: bool = False, use_repa: bool = True,
          condition: str = "class") -> Setup:
    """The modules of one stage on tiny models, every update a `Probe`. `vq_weights=False` zeroes the L_VQ
    weights (L1, quantizer, GAN; LPIPS is always 0) so that the tokenizer update sees λ·L_align^s alone.
    `condition="text"`: a text-conditional AR, captions encoded by a tiny frozen text encoder."""
    torch.manual_seed(0)
    cfg = TrainingConfig()
    cfg.train.stage = stage
    cfg.gear.align_layer = ALIGN_LAYER
    cfg.gear.straight_through = straight_through
    cfg.gear.use_repa = use_repa
    cfg.gear.projector_dim = 64
    tokenizer = make_tokenizer(quantizer)
    ar = make_ar(condition) if stage in (1, 2) else None
    teacher = make_teacher() if stage == 1 or (stage == 2 and use_repa) else None
    projector = ProjectorBank(ar.config.hidden_size, [teacher.hidden_size], 64) if teacher is not None else None
    discriminator = tokenizer_loss = None
    if stage in (0, 1):
        weight = 1.0 if vq_weights else 0.0
        tokenizer_loss = TokenizerLoss(l1_weight=weight, lpips_weight=0.0, quantizer_weight=weight,
                                       gan_weight=0.1 if gan and vq_weights else 0.0)
        discriminator = PatchGANDiscriminator(3, 16, 2) if tokenizer_loss.gan_weight > 0 else None
    if stage == 2:
        tokenizer.check_input_range = False  # left in train mode and requiring grad on purpose: ar_step must cope

    groups = tokenizer_groups(tokenizer)
    if ar is not None:
        groups["ar_embedding"] = list(ar.tok_embeddings.parameters())  # E, used by both branches
        groups["ar"] = [p for n, p in ar.named_parameters() if not n.startswith("tok_embeddings.")]
    if projector is not None:
        groups["projector"] = list(projector.parameters())
    if discriminator is not None:
        groups["discriminator"] = list(discriminator.parameters())

    timeline: list = []

    def probe(name, model, params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # as the recipe: decay would move unreached params
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return Probe(accelerator, model, opt, sched, 1.0, name=name, groups=groups, timeline=timeline)

    probes = {}
    if stage in (0, 1):
        probes["tokenizer"] = probe("tokenizer", tokenizer, list(tokenizer.parameters()))
    if ar is not None:
        probes["ar"] = probe("ar", ar, list(ar.parameters()) + (list(projector.parameters()) if projector else []))
    if discriminator is not None:
        probes["discriminator"] = probe("discriminator", discriminator, list(discriminator.parameters()))
    m = GEARModules(
        tokenizer=tokenizer, ar=ar, projector=projector, teacher=teacher, tokenizer_loss=tokenizer_loss,
        discriminator=discriminator, tokenizer_update=probes.get("tokenizer"), ar_update=probes.get("ar"),
        discriminator_update=probes.get("discriminator"),
        tokenizer_ema=EMA(tokenizer, 0.9, include_buffers=True) if stage in (0, 1) else None,
        ar_ema=EMA(ar, 0.9) if ar is not None else None,
    )
    generator = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randint(0, 256, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                                           generator=generator)}
    if condition == "text":
        tokenizer_text = byte_level_tokenizer()
        m.text_conditioner = TextConditioner(tokenizer_text, tiny_text_encoder(tokenizer_text), max_length=12,
                                             caption_dropout=0.5)
        batch["captions"] = ["a red car", "a cat on a sofa"]
    else:
        batch["labels"] = torch.tensor([3, 7])
    return Setup(m, cfg, batch, timeline, probes)


def watch_ar(setup: Setup) -> None:
    """Forward hooks: every AR call (its inputs) and every AR block / final norm / head run, with train flag."""
    ar, timeline = setup.m.ar, setup.timeline

    def on_call(module, args, kwargs):
        timeline.append(("ar_call", {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                                     "input_probs": kwargs.get("input_probs"),
                                     "input_logits": kwargs.get("input_logits"),
                                     "temperature": kwargs.get("temperature"),
                                     "stop_at_layer": kwargs.get("stop_at_layer"), "training": module.training}))

    ar.register_forward_pre_hook(on_call, with_kwargs=True)
    named = {f"layers.{i}": layer for i, layer in enumerate(ar.layers)}
    named.update({"norm": ar.norm, "output": ar.output})
    for name, module in named.items():
        module.register_forward_hook(lambda mod, args, out, name=name: timeline.append(("ran", name, mod.training)))


def phases(timeline: list) -> dict[str, list]:
    """Split the timeline at the update calls: events before the tokenizer update are the soft pass (Algorithm 1
    lines 1-4), events between the discriminator (or tokenizer) update and the AR update the hard pass."""
    out, current = {}, "soft"
    out[current] = []
    for event in timeline:
        if event[0] == "update":
            current = f"after_{event[1]}"
            out.setdefault(current, [])
        else:
            out[current].append(event)
    return out


# ---------------------------------------------------------------------------------------------------------------
# (a) the hard branch: NTP (and L_align^h) give the tokenizer exactly zero gradient
# ---------------------------------------------------------------------------------------------------------------


CASES = [(q, "class") for q in QUANTIZERS] + [("vq", "text")]  # the text-conditional AR routes the same way


@pytest.mark.parametrize("quantizer, condition", CASES)
def test_ntp_gives_no_gradient_to_tokenizer(accelerator, quantizer, condition):
    s = build(accelerator, quantizer, condition=condition)
    m = s.m
    # As the step computes it: tokenizer forward (train mode) → hard tokens → full AR forward → NTP → backprop.
    tok_out = m.tokenizer(s.batch["pixel_values"].float() / 127.5 - 1, return_assignment=True)
    tokens = tok_out.indices.flatten(1)
    logits = m.ar(input_ids=tokens[:, :-1], **batch_condition(m, s.batch).model_kwargs()).logits
    ntp = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    tok_params = list(m.tokenizer.parameters())
    grads = torch.autograd.grad(ntp, tok_params + list(m.ar.parameters()), allow_unused=True)
    assert not _nonzero(grads[: len(tok_params)]), "NTP on hard tokens reached the tokenizer"
    assert _nonzero(grads[len(tok_params):]), "sanity: NTP must train the AR"

    # In the real step: the AR update's loss (L_NTP + λ L_align^h) reaches the AR and projector, never θ_tok,
    # and the hard AR call is fed integer ids (never input_probs).
    watch_ar(s)
    logs = gear_step(m, s.batch, s.cfg)
    rec = s.record("ar")
    assert rec["grad"]["ar"] is True and rec["grad"]["ar_embedding"] is True and rec["grad"]["projector"] is True
    for group in TOKENIZER_GROUPS:
        assert not rec["connected"][group], f"the AR loss (NTP + λ L_align^h) is connected to the tokenizer's {group}"
        assert not rec["grads_after"][group], f"the AR update left gradient on the tokenizer's {group}"
    hard_calls = [e[1] for e in phases(s.timeline)["after_discriminator"] if e[0] == "ar_call"]
    assert len(hard_calls) == 1
    call = hard_calls[0]
    assert call["input_probs"] is None and call["input_logits"] is None and call["stop_at_layer"] is None
    assert call["input_ids"] is not None and not call["input_ids"].is_floating_point()
    assert torch.equal(call["input_ids"], tokens[:, :-1]), "the AR must see argmax A of this step's forward"
    assert torch.isfinite(logs["ar/ntp_loss"])


# ---------------------------------------------------------------------------------------------------------------
# (b) the soft branch: updates only the tokenizer, and its guidance does reach encoder and codebook
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer, condition", CASES)
def test_each_phase_moves_only_its_own_module(accelerator, quantizer, condition):
    """Which parameters move in which phase of one real `gear_step` (all losses on), and that no phase leaves a
    gradient on another module: an AR/projector `.grad` written by the soft branch would survive the tokenizer's
    zero_grad and be applied by the AR optimizer."""
    s = build(accelerator, quantizer, condition=condition)
    initial = s.probes["tokenizer"]._state()
    gear_step(s.m, s.batch, s.cfg)
    assert [e[1] for e in s.timeline if e[0] == "update"] == ["tokenizer", "discriminator", "ar"]
    tok, disc, ar = s.record("tokenizer"), s.record("discriminator"), s.record("ar")

    # Nothing moves between phases, and no stale gradient exists when a phase starts.
    for rec in (tok, disc, ar):
        assert not any(rec["grads_before"].values()), f"stale gradients before an update: {rec['grads_before']}"
    for group in initial:
        assert all(torch.equal(a, b) for a, b in zip(initial[group], tok["before"][group]))
        assert all(torch.equal(a, b) for a, b in zip(tok["after"][group], disc["before"][group]))
        assert all(torch.equal(a, b) for a, b in zip(disc["after"][group], ar["before"][group]))

    # Tokenizer half (line 6): L_VQ + λ L_align^s reaches and moves θ_tok only.
    for group in ("ar", "ar_embedding", "projector", "discriminator"):
        assert not tok["connected"][group], f"the tokenizer loss (soft branch / GAN term) is connected to {group}"
        assert not tok["grads_after"][group], f"the tokenizer update left gradient on {group}"
        assert not tok["moved"][group], f"{group} moved in the tokenizer update"
    assert tok["moved"]["encoder"] and tok["moved"]["decoder"]
    assert tok["moved"]["codebook"] == (quantizer != "lfq")  # LFQ's codebook is implicit (no parameters)

    # Discriminator update: only the discriminator.
    assert {g for g, moved in disc["moved"].items() if moved} == {"discriminator"}
    assert not any(disc["grads_after"].values())

    # AR half (line 7): L_NTP + λ L_align^h moves the AR (incl. E) and the projector only.
    assert {g for g, moved in ar["moved"].items() if moved} == {"ar", "ar_embedding", "projector"}
    assert not any(ar["grads_after"].values())


@pytest.mark.parametrize("straight_through", [False, True], ids=["soft", "straight_through"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_soft_guidance_reaches_encoder_and_codebook_only(accelerator, quantizer, straight_through):
    """With the L_VQ weights at 0 the tokenizer update's loss is λ·L_align^s alone: it must have a non-zero
    gradient for the encoder and the codebook (through π = softmax(A/τ)), none for the decoder (the soft branch
    does not decode), and none for the AR, its embedding table E or the projector, with and without the
    straight-through ablation."""
    s = build(accelerator, quantizer, vq_weights=False, straight_through=straight_through)
    logs = gear_step(s.m, s.batch, s.cfg)
    assert float(logs["tokenizer/loss"]) == 0.0  # L_VQ switched off: only the soft guidance remains
    tok = s.record("tokenizer")
    assert tok["grad"]["encoder"] is True, "soft guidance does not reach the encoder"
    if quantizer != "lfq":  # LFQ's codebook is the fixed sign patterns: no parameters
        assert tok["grad"]["codebook"] is True, "soft guidance does not reach the codebook"
    assert tok["moved"]["encoder"]
    assert not tok["grad"]["decoder"] and not tok["moved"]["decoder"], "the soft branch does not decode"
    for group in ("ar", "ar_embedding", "projector"):
        assert not tok["connected"][group], f"the soft branch is connected to {group} (must be frozen)"
        assert not tok["grads_after"][group] and not tok["moved"][group], group


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_table7_straight_through_lets_ntp_reach_the_tokenizer(accelerator, quantizer):
    """`gear.straight_through_ntp` (the paper's Table 7 straight-through arm): the hard branch is fed the
    straight-through one-hot, so L_NTP + λ L_align^h reach encoder and codebook. With L_VQ and λ_tok at 0 only
    that path can move the tokenizer: it does with the switch, and nothing moves it without."""
    moved = {}
    for switch in (False, True):
        s = build(accelerator, quantizer, vq_weights=False)
        s.cfg.gear.tokenizer_align_weight = 0.0
        s.cfg.gear.straight_through_ntp = switch
        groups = tokenizer_groups(s.m.tokenizer)
        before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        ar_before = [p.detach().clone() for p in s.m.ar.parameters()]
        logs = gear_step(s.m, s.batch, s.cfg)
        moved[switch] = {g: any(not torch.equal(a, p) for a, p in zip(before[g], groups[g])) for g in groups}
        assert any(not torch.equal(a, p) for a, p in zip(ar_before, s.m.ar.parameters())), "the AR must learn"
        assert torch.isfinite(logs["ar/ntp_loss"])
    assert not any(moved[False].values()), f"without the switch the hard branch moved the tokenizer: {moved[False]}"
    assert moved[True]["encoder"], "NTP through the straight-through one-hot must reach the encoder"
    if quantizer != "lfq":
        assert moved[True]["codebook"]
    assert not moved[True]["decoder"], "the hard branch does not decode"

    # The gradient itself: NTP of the straight-through input is connected to the tokenizer, of hard ids it is not.
    s = build(accelerator, quantizer)
    tok_out = s.m.tokenizer(s.batch["pixel_values"].float() / 127.5 - 1, return_assignment=True)
    tokens = tok_out.indices.flatten(1)
    pi = torch.softmax(tok_out.assignment_logits / s.cfg.gear.temperature, -1)
    one_hot = pi + (F.one_hot(tokens, K).float() - pi).detach()
    logits = s.m.ar(input_probs=one_hot[:, :-1], class_labels=s.batch["labels"]).logits
    ntp = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    encoder = tokenizer_groups(s.m.tokenizer)["encoder"]
    assert _nonzero(torch.autograd.grad(ntp, encoder, allow_unused=True))


# ---------------------------------------------------------------------------------------------------------------
# (c) the soft pass is truncated at ℓ and runs the AR in eval mode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer, condition", CASES)
def test_soft_pass_runs_blocks_up_to_align_layer_only(accelerator, quantizer, condition):
    s = build(accelerator, quantizer, condition=condition)
    watch_ar(s)
    gear_step(s.m, s.batch, s.cfg)
    split = phases(s.timeline)
    soft, hard = split["soft"], split["after_discriminator"]

    soft_calls = [e[1] for e in soft if e[0] == "ar_call"]
    assert len(soft_calls) == 1, "exactly one AR call before the tokenizer update (the soft branch)"
    call = soft_calls[0]
    assert call["input_ids"] is None and call["stop_at_layer"] == ALIGN_LAYER and not call["training"]
    # The soft read-out of this step's assignment: A[:, :-1] and τ, embedded by the AR as softmax(A/τ)·E.
    assert call["input_probs"] is None and call["temperature"] == s.cfg.gear.temperature
    logits = call["input_logits"]
    assert logits.shape == (BATCH, GRID * GRID - 1, K) and logits.requires_grad
    ran = [e[1] for e in soft if e[0] == "ran"]
    assert ran == [f"layers.{i}" for i in range(ALIGN_LAYER)], f"soft pass ran {ran}, expected blocks 1..ℓ only"
    assert not any(e[2] for e in soft if e[0] == "ran"), "soft pass must run the AR in eval mode"

    ran_hard = [e[1] for e in hard if e[0] == "ran"]
    assert ran_hard == [f"layers.{i}" for i in range(NUM_LAYERS)] + ["norm", "output"]
    assert all(e[2] for e in hard if e[0] == "ran"), "the hard branch trains the AR in train mode"
    assert not any(e[0] == "ar_call" for e in split["after_tokenizer"]), "the AR must not run in the disc phase"


# ---------------------------------------------------------------------------------------------------------------
# (d) discriminator and GAN term
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_discriminator_and_generator_do_not_touch_each_other(accelerator, quantizer):
    s = build(accelerator, quantizer)
    logs = gear_step(s.m, s.batch, s.cfg)
    assert float(logs["tokenizer/gan"]) != 0.0 and "discriminator/loss" in logs  # both GAN halves active
    tok, disc = s.record("tokenizer"), s.record("discriminator")
    # Generator's GAN term: no gradient into the discriminator (neither in the loss nor left in .grad).
    assert not tok["connected"]["discriminator"] and not tok["grads_after"]["discriminator"]
    assert not tok["moved"]["discriminator"]
    # Discriminator step: hinge on (x, sg(x̂)) reaches and moves the discriminator only.
    assert disc["grad"]["discriminator"] is True and disc["moved"]["discriminator"]
    for group in TOKENIZER_GROUPS:
        assert not disc["connected"][group], f"the discriminator loss is connected to the tokenizer's {group}"
        assert not disc["grads_after"][group] and not disc["moved"][group]


# ---------------------------------------------------------------------------------------------------------------
# (e) the three steps run and report finite, detached scalars
# ---------------------------------------------------------------------------------------------------------------

GEAR_KEYS = {
    "tokenizer/loss", "tokenizer/l1", "tokenizer/lpips", "tokenizer/quantizer", "tokenizer/gan",
    "tokenizer/align_loss", "grad_norm/tokenizer",
    "discriminator/loss", "discriminator/logits_real", "discriminator/logits_fake", "grad_norm/discriminator",
    "ar/ntp_loss", "ar/align_loss", "grad_norm/ar",
}


def assert_scalar_logs(logs: dict, keys: set) -> None:
    assert set(logs) == keys, f"missing {keys - set(logs)}, unexpected {set(logs) - keys}"
    for key, value in logs.items():
        assert torch.is_tensor(value) and value.numel() == 1, key
        assert not value.requires_grad and value.grad_fn is None, f"{key} is not detached"
        assert math.isfinite(float(value)), f"{key} = {float(value)}"


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_gear_step_runs_and_logs_finite_detached_scalars(accelerator, quantizer):
    s = build(accelerator, quantizer)
    extras = {"with_assignment": True}
    logs = gear_step(s.m, s.batch, s.cfg, step=0, extras=extras)
    assert_scalar_logs(logs, GEAR_KEYS)
    assert extras["indices"].shape == (BATCH, GRID * GRID) and not extras["indices"].requires_grad
    assert extras["assignment_logits"].shape == (BATCH, GRID * GRID, K)
    assert not extras["assignment_logits"].requires_grad
    assert torch.equal(extras["assignment_logits"].argmax(-1), extras["indices"])
    assert s.m.tokenizer_ema.num_updates == 1 and s.m.ar_ema.num_updates == 1
    # A second step (warm optimizers, AR in train mode from the previous step) still runs cleanly.
    assert_scalar_logs(gear_step(s.m, s.batch, s.cfg, step=1), GEAR_KEYS)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_tokenizer_step_runs(accelerator, quantizer):
    s = build(accelerator, quantizer, stage=0)
    logs = tokenizer_step(s.m, s.batch, s.cfg, step=0, extras={"with_assignment": True})
    keys = {k for k in GEAR_KEYS if not k.startswith("ar/") and k not in ("grad_norm/ar", "tokenizer/align_loss")}
    assert_scalar_logs(logs, keys)
    tok = s.record("tokenizer")
    assert tok["moved"]["encoder"] and tok["moved"]["decoder"] and not tok["moved"]["discriminator"]
    assert s.m.tokenizer_ema.num_updates == 1


@pytest.mark.parametrize("use_repa", [True, False], ids=["repa", "no_repa"])
def test_ar_step_leaves_tokenizer_unchanged(accelerator, use_repa):
    """Stage 2 on a tokenizer deliberately left in train mode with requires_grad=True: the step must still
    encode without gradient and change no tokenizer parameter or buffer."""
    s = build(accelerator, "vq", stage=2, use_repa=use_repa)
    before = {k: v.clone() for k, v in s.m.tokenizer.state_dict().items()}
    logs = ar_step(s.m, s.batch, s.cfg)
    keys = {"ar/ntp_loss", "grad_norm/ar"} | ({"ar/align_loss"} if use_repa else set())
    assert_scalar_logs(logs, keys)
    after = s.m.tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "ar_step changed the tokenizer"
    assert all(p.grad is None for p in s.m.tokenizer.parameters())
    ar = s.record("ar")
    assert not any(ar["connected"][g] for g in TOKENIZER_GROUPS)
    assert ar["moved"]["ar"] and ar["moved"]["ar_embedding"]
    assert ar["moved"].get("projector", False) == use_repa
