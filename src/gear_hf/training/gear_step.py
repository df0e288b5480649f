"""The GEAR training steps.

`gear_step` is one stage-1 step and follows Algorithm 1 of the paper line by line:

    1-2  tokenizer forward: assignment A, hard tokens q = argmax A, reconstruction x̂, L_VQ
    3-4  soft read-out π = softmax(A/τ) → AR embeddings → AR blocks 1..ℓ (AR frozen, eval mode)
    6    tokenizer update:     L_VQ + λ_tok · L_align(soft)
         discriminator update: hinge on (x, sg(x̂))
    3-5  hard read-out q → full AR forward (train mode)
    7    AR update:            L_NTP + λ_AR · L_align(hard)
         EMA of tokenizer and AR

`tokenizer_step` (stage 0) and `ar_step` (stage 2) are the same pieces without the other half.
Each update goes through a `ModuleUpdate`, so DDP (one accelerator) and DeepSpeed (one engine, hence one
accelerator, per trainable module) share this code.

The AR's condition is class labels (`batch["labels"]`) or captions (`batch["captions"]`, encoded by the frozen
text encoder of `GEARModules.text_conditioner`); both branches see the same condition, and the hard branch drops
it for CFG (class labels inside the model in train mode, captions here, as the official trainers do).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import GEARCondition
from ..models.quantizers import soft_readout
from .alignment import repa_loss, spatial_norm


@dataclass
class ModuleUpdate:
    """backward → clip → optimizer step → LR step → zero grad, for one trainable module."""

    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float

    def __call__(self, loss: torch.Tensor, parameters=None) -> torch.Tensor | None:
        """`parameters` to clip: an iterable or a function returning one (read after the backward: FSDP2 swaps a
        root's unsharded parameters for its shards there); default: the model's."""
        self.accelerator.backward(loss)
        return self.step(parameters)

    def step(self, parameters=None) -> torch.Tensor | None:
        """clip → optimizer step → LR step → zero grad, on gradients already accumulated."""
        grad_norm = None
        if self.accelerator.sync_gradients and self.max_grad_norm > 0:
            params = parameters() if callable(parameters) else parameters
            params = params if params is not None else self.model.parameters()
            grad_norm = self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


@dataclass
class GEARModules:
    """Everything a step touches. `*_update` are None for modules that are frozen in the stage."""

    tokenizer: nn.Module
    ar: nn.Module | None
    projector: nn.Module | None
    teacher: nn.Module | None
    tokenizer_loss: nn.Module | None  # L_VQ pieces: L1, LPIPS, GAN, quantizer (see losses.TokenizerLoss)
    discriminator: nn.Module | None
    tokenizer_update: ModuleUpdate | None = None
    ar_update: ModuleUpdate | None = None
    discriminator_update: ModuleUpdate | None = None
    tokenizer_ema: object | None = None
    ar_ema: object | None = None
    text_conditioner: object | None = None  # text-to-image: `gear_hf.text_encoder.TextConditioner` (frozen)


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Parameters of `modules` do not require grad inside the block (restored afterwards)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers, for passes that need no gradient sync."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def to_signed_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], the tokenizer's input range (official `x / 127.5 - 1`)."""
    return images_uint8.float() / 127.5 - 1.0


def batch_condition(m: GEARModules, batch: dict) -> GEARCondition:
    """The AR's condition for a batch: its class labels, or the frozen encoding of its captions."""
    if "captions" in batch:
        if m.text_conditioner is None:
            raise ValueError("The batch has captions but the step has no text encoder (text_conditioner).")
        return m.text_conditioner.encode(batch["captions"])
    return GEARCondition(class_labels=batch["labels"])


def dropped_for_guidance(m: GEARModules, condition: GEARCondition) -> GEARCondition:
    """The hard branch's condition: captions replaced by the null caption with probability `caption_dropout`
    (class labels are dropped inside the AR in train mode, `class_dropout_prob`)."""
    return m.text_conditioner.drop(condition) if condition.is_text else condition


def teacher_targets(m: GEARModules, images_uint8: torch.Tensor, cfg=None) -> torch.Tensor:
    """f(x): frozen teacher patch features (B, L, D), with the iREPA spatial normalisation of `cfg.teacher`."""
    with torch.no_grad():
        target = m.teacher(images_uint8)
        if cfg is not None and cfg.teacher.spatial_norm != "none":
            target = spatial_norm(target.float(), cfg.teacher.spatial_norm, cfg.teacher.spatial_norm_alpha)
        return target


def align_loss(hidden: torch.Tensor, target: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    """REPA: −cos(g_φ(h), f(x)) averaged over batch and positions. `hidden` row p predicts token p."""
    return repa_loss(projector(hidden), target)


def vq_loss(m, x, tok_out, logs, step=0) -> torch.Tensor:
    """L_VQ (reconstruction, perceptual, quantizer and, once active, the generator's GAN term), logged."""
    disc = unwrap(m.discriminator) if m.discriminator is not None else None
    with frozen(disc):  # the generator's GAN term must not write discriminator gradients
        vq = m.tokenizer_loss.generator_loss(x, tok_out.reconstruction, tok_out.quantizer_loss, disc, step=step)
    logs.update({f"tokenizer/{k}": v.detach() for k, v in vq.items()})
    return vq["loss"]


def discriminator_updates(m, x, tok_out, logs, step=0) -> None:
    """The discriminator step on sg(x̂), once the GAN term is active."""
    if m.discriminator is not None and m.discriminator_update is not None and m.tokenizer_loss.gan_active(step):
        d = m.tokenizer_loss.discriminator_loss(x, tok_out.reconstruction.detach(), m.discriminator)
        logs.update({f"discriminator/{k}": v.detach() for k, v in d.items()})
        logs["grad_norm/discriminator"] = m.discriminator_update(d["loss"])


def tokenizer_and_discriminator_updates(m, x, tok_out, extra_loss, logs, step=0):
    """Line 6 of Algorithm 1 plus the discriminator step (shared by stage 0 and stage 1).

    `step` is the number of optimizer steps done so far (GAN term and discriminator start at
    `loss.discriminator_start`)."""
    logs["grad_norm/tokenizer"] = m.tokenizer_update(vq_loss(m, x, tok_out, logs, step) + extra_loss)
    discriminator_updates(m, x, tok_out, logs, step)


def straight_through_one_hot(assignment_logits: torch.Tensor, tokens: torch.Tensor, temperature: float
                             ) -> torch.Tensor:
    """Forward exactly one-hot(tokens), backward through π = softmax(A/τ) (the straight-through ablations)."""
    pi = soft_readout(assignment_logits, temperature)
    return pi + (F.one_hot(tokens, pi.shape[-1]).to(pi.dtype) - pi).detach()


def hard_branch_loss(m, tokens, condition: GEARCondition, target, align_layer, align_weight, logs,
                     input_probs=None) -> torch.Tensor:
    """Lines 3-5: hard tokens (or, in the Table 7 ablation, their straight-through one-hot `input_probs`) → full AR
    forward in train mode → L_NTP + λ·L_align(hard)."""
    m.ar.train()
    use_repa = target is not None and align_weight > 0
    condition = dropped_for_guidance(m, condition)
    tokens_in = {"input_ids": tokens[:, :-1]} if input_probs is None else {"input_probs": input_probs[:, :-1]}
    out = m.ar(**tokens_in, **condition.model_kwargs(), output_hidden_states=use_repa)
    ntp = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens.flatten())
    loss = ntp
    logs["ar/ntp_loss"] = ntp.detach()
    if use_repa:
        align_hard = align_loss(out.hidden_states[align_layer], target, m.projector)
        loss = loss + align_weight * align_hard
        logs["ar/align_loss"] = align_hard.detach()
    return loss


def ar_parameters(m, target, align_weight) -> list:
    """Each parameter once (FSDP2 / DeepSpeed: `m.ar` is the AR engine's root, which holds the projector)."""
    uses_projector = target is not None and align_weight > 0
    return list(dict.fromkeys([*m.ar.parameters(), *(m.projector.parameters() if uses_projector else ())]))


def ar_updates(m, tokens, condition: GEARCondition, target, align_layer, align_weight, logs):
    """Lines 3-5 and 7: hard tokens → full AR forward → L_NTP + λ·L_align(hard) → AR (+ projector) update."""
    loss = hard_branch_loss(m, tokens, condition, target, align_layer, align_weight, logs)
    # Read after the backward (FSDP2 swaps the root's unsharded parameters back to shards there).
    logs["grad_norm/ar"] = m.ar_update(loss, lambda: ar_parameters(m, target, align_weight))


def straight_through_updates(m, x, tok_out, tokens, one_hot, condition, target, soft_loss, logs, step, cfg):
    """Ablation (paper Table 7's straight-through reading, `gear.straight_through_ntp`): the hard branch is fed the
    straight-through one-hot of the tokens (`one_hot`: forward = one-hot, backward through π = softmax(A/τ)), so one
    backward of L_VQ + λ_tok·L_align^s + L_NTP + λ_AR·L_align^h reaches the tokenizer AND the AR; then each module
    steps. The paper reports this arm collapsing (gFID 104.9, rFID 59.7)."""
    g = cfg.gear
    hard = hard_branch_loss(m, tokens, condition, target, g.align_layer, g.ar_align_weight, logs, one_hot)
    vq = vq_loss(m, x, tok_out, logs, step)
    m.tokenizer_update.accelerator.backward(vq + g.tokenizer_align_weight * soft_loss + hard)
    logs["grad_norm/tokenizer"] = m.tokenizer_update.step()
    logs["grad_norm/ar"] = m.ar_update.step(ar_parameters(m, target, g.ar_align_weight))
    discriminator_updates(m, x, tok_out, logs, step)


def _record_stats(extras, tok_out, tokens):
    """Hand the step's hard tokens and assignment logits to the caller (codebook statistics), detached."""
    if extras is not None:
        extras["indices"] = tokens.detach()
        if extras.get("with_assignment") and tok_out.assignment_logits is not None:
            extras["assignment_logits"] = tok_out.assignment_logits.detach()


def gear_step(m: GEARModules, batch: dict, cfg, step: int = 0, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """One stage-1 GEAR step (Algorithm 1). `cfg` is a `TrainingConfig`; `step` the optimizer steps done so far;
    `extras`, when a dict, receives the hard tokens and assignment logits (for codebook statistics).
    Returns detached scalars."""
    images = batch["pixel_values"]
    x = to_signed_unit(images)
    g = cfg.gear
    logs: dict[str, torch.Tensor] = {}

    target = teacher_targets(m, images, cfg)  # f(x): frozen teacher features, (B, L, D)
    condition = batch_condition(m, batch)  # class labels, or the frozen encoding of the captions

    # 1-2: Z = E(x), A = assignment to the codebook, x̂ = D(c_argmax A), L_VQ pieces.
    m.tokenizer.train()
    tok_out = m.tokenizer(x, return_assignment=True)
    tokens = tok_out.indices.flatten(1)  # hard read-out q: integers, so no gradient path to the tokenizer
    _record_stats(extras, tok_out, tokens)

    # 3-4 (soft): π = softmax(A/τ); u^s = π E (the AR's own table, row-chunked: no N×K tensor kept); AR blocks
    # 1..ℓ only. The AR and projector are frozen and in eval mode: this loss updates only the tokenizer.
    ar, projector = unwrap(m.ar), unwrap(m.projector)
    ar.eval()
    one_hot = None
    if g.straight_through or g.straight_through_ntp:  # ablation: forward exactly one-hot, backward through π
        one_hot = straight_through_one_hot(tok_out.assignment_logits, tokens, g.temperature)
    with frozen(ar, projector):
        soft = {"input_logits": tok_out.assignment_logits[:, :-1], "temperature": g.temperature}
        if one_hot is not None:
            soft = {"input_probs": one_hot[:, :-1]}
        h_soft = ar(**soft, **condition.model_kwargs(), stop_at_layer=g.align_layer).last_hidden_state
        align_soft = align_loss(h_soft, target, projector)
    logs["tokenizer/align_loss"] = align_soft.detach()

    if g.straight_through_ntp:  # ablation: NTP and L_align^h also reach the tokenizer (one joint backward)
        straight_through_updates(m, x, tok_out, tokens, one_hot, condition, target, align_soft, logs, step, cfg)
        update_emas(m)
        return logs

    # 6: θ_tok ← θ_tok − η∇(L_VQ + λ L_align^s); then the discriminator on sg(x̂).
    tokenizer_and_discriminator_updates(m, x, tok_out, g.tokenizer_align_weight * align_soft, logs, step)

    # 3-5, 7 (hard): θ_AR ← θ_AR − η∇(L_NTP + λ L_align^h).
    ar_updates(m, tokens, condition, target, g.align_layer, g.ar_align_weight, logs)

    update_emas(m)
    return logs


def tokenizer_step(m: GEARModules, batch: dict, cfg, step: int = 0, extras: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """Stage 0 (tokenizer warm-up): L_VQ update, discriminator update, tokenizer EMA."""
    x = to_signed_unit(batch["pixel_values"])
    logs: dict[str, torch.Tensor] = {}
    m.tokenizer.train()
    tok_out = m.tokenizer(x, return_assignment=bool(extras and extras.get("with_assignment")))
    _record_stats(extras, tok_out, tok_out.indices.flatten(1))
    tokenizer_and_discriminator_updates(m, x, tok_out, 0.0, logs, step)
    update_emas(m)
    return logs


def ar_step(m: GEARModules, batch: dict, cfg, step: int = 0, extras: dict | None = None
            ) -> dict[str, torch.Tensor]:
    """Stage 2: a fresh AR on the frozen tokenizer (encoded in fp32, no autocast), NTP (+ REPA)."""
    images = batch["pixel_values"]
    logs: dict[str, torch.Tensor] = {}
    use_repa = cfg.gear.use_repa and m.teacher is not None
    target = teacher_targets(m, images, cfg) if use_repa else None
    with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
        tokens = unwrap(m.tokenizer).encode(to_signed_unit(images)).indices.flatten(1)
    if extras is not None:
        extras["indices"] = tokens
    ar_updates(m, tokens, batch_condition(m, batch), target, cfg.gear.align_layer, cfg.gear.ar_align_weight, logs)
    update_emas(m)
    return logs


def update_emas(m: GEARModules) -> None:
    """EMA after each optimizer step (not after accumulation micro-steps)."""
    for ema, update, model in ((m.tokenizer_ema, m.tokenizer_update, m.tokenizer), (m.ar_ema, m.ar_update, m.ar)):
        if ema is not None and update is not None and update.accelerator.sync_gradients:
            ema.update(unwrap(model))
