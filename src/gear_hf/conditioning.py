"""What an image is conditioned on: class labels, or text embeddings with their padding mask.

One home for the condition that the AR, the sampler, the training steps and the pipeline share. A
`GEARCondition` holds either `class_labels` (B,) or `text_embeds` (B, L, C) + `text_attention_mask` (B, L) and
knows the few operations they all need: its batch size, the keyword arguments of the AR's forward, row selection,
and the classifier-free-guidance batch `[cond; uncond]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GEARCondition:
    """Class labels `(B,)`, or text embeddings `(B, L, C)` with a `(B, L)` mask (1 = real token, 0 = padding)."""

    class_labels: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_attention_mask: torch.Tensor | None = None

    def __post_init__(self):
        if (self.class_labels is None) == (self.text_embeds is None):
            raise ValueError("A GEARCondition holds either class_labels or text_embeds (with text_attention_mask).")
        if self.text_embeds is not None:
            if self.text_embeds.dim() != 3:
                raise ValueError(f"text_embeds must be (B, L, C), got shape {tuple(self.text_embeds.shape)}.")
            mask = self.text_attention_mask
            if mask is None:  # no padding information: every position is a real token
                mask = torch.ones(self.text_embeds.shape[:2], dtype=torch.long, device=self.text_embeds.device)
            elif tuple(mask.shape) != tuple(self.text_embeds.shape[:2]):
                raise ValueError(f"text_attention_mask must be (B, L) = {tuple(self.text_embeds.shape[:2])} like "
                                 f"text_embeds, got {tuple(mask.shape)}.")
            object.__setattr__(self, "text_attention_mask", mask)

    @property
    def is_text(self) -> bool:
        return self.text_embeds is not None

    @property
    def batch_size(self) -> int:
        return (self.text_embeds if self.is_text else self.class_labels).shape[0]

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `GEARForCausalImageLM.forward` for this condition."""
        if self.is_text:
            return {"text_embeds": self.text_embeds, "text_attention_mask": self.text_attention_mask}
        return {"class_labels": self.class_labels}

    def _map(self, fn) -> GEARCondition:
        if self.is_text:
            return GEARCondition(text_embeds=fn(self.text_embeds), text_attention_mask=fn(self.text_attention_mask))
        return GEARCondition(class_labels=fn(self.class_labels))

    def rows(self, n: int) -> GEARCondition:
        """The first `n` rows (e.g. the conditional half of a CFG batch)."""
        return self._map(lambda t: t[:n])

    def to(self, device) -> GEARCondition:
        if self.is_text:
            return GEARCondition(text_embeds=self.text_embeds.to(device),
                                 text_attention_mask=self.text_attention_mask.to(device))
        return GEARCondition(class_labels=self.class_labels.to(device))

    def with_unconditional(self, null: GEARCondition) -> GEARCondition:
        """The CFG batch `[self; null]`, the unconditional half broadcast from one row if `null` has one."""
        if null.is_text != self.is_text:
            raise ValueError("The unconditional condition must be of the same kind (class or text) as the condition.")
        b = self.batch_size
        if null.batch_size not in (1, b):
            raise ValueError(f"The unconditional condition has {null.batch_size} rows; give 1 (broadcast) or {b}.")
        if self.is_text:
            if null.text_embeds.shape[1:] != self.text_embeds.shape[1:]:
                raise ValueError(f"Unconditional text_embeds {tuple(null.text_embeds.shape[1:])} and text_embeds "
                                 f"{tuple(self.text_embeds.shape[1:])} must share (L, C): encode both with the same "
                                 "encoder and max_length.")
            embeds = null.text_embeds.to(self.text_embeds).expand(b, -1, -1)
            mask = null.text_attention_mask.to(self.text_attention_mask).expand(b, -1)
            return GEARCondition(text_embeds=torch.cat([self.text_embeds, embeds]),
                                 text_attention_mask=torch.cat([self.text_attention_mask, mask]))
        return GEARCondition(class_labels=torch.cat([self.class_labels, null.class_labels.to(self.class_labels)
                                                     .expand(b)]))


__all__ = ["GEARCondition"]
