"""Exponential moving average of a model's weights (the AR `ema` and the tokenizer `vq_ema` of the paper).

ema ← decay·ema + (1 − decay)·param after every optimizer step, decay 0.9999, starting from an exact copy.
The EMA is a frozen deep copy of the model (`ema.model`), so it can be evaluated, sampled from or saved with
`save_pretrained` directly — the live weights are never swapped out.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _canonical(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class EMA:
    """EMA of `model`'s parameters and, with `include_buffers=True`, its floating-point buffers (other buffers are
    copied). The official Stage-0/1 tokenizer EMA includes buffers; the AR and Stage-2 EMAs do not.

    Has `state_dict`/`load_state_dict`, so `accelerator.register_for_checkpointing(ema)` saves and restores it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, include_buffers: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.include_buffers = include_buffers
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._names = [_canonical(name) for name, _ in self.model.named_parameters()]
        self._params = [p for _, p in self.model.named_parameters()]
        float_buffers = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        self._float_buffers = [b for _, b in float_buffers]
        self._float_buffer_names = [_canonical(n) for n, _ in float_buffers]
        self._checked = False

    def _source(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        named = list(model.named_parameters())
        if not self._checked:  # name check once; later calls only compare lengths
            names = [_canonical(n) for n, _ in named]
            if names != self._names:
                missing = sorted(set(self._names) ^ set(names))[:5]
                raise ValueError(f"EMA: the model's parameters differ from the EMA copy (e.g. {missing}).")
            self._checked = True
        if len(named) != len(self._params):
            raise ValueError("EMA: the model's parameter count changed since the EMA was created.")
        params = [p.detach() for _, p in named]
        buffers, other_buffers = [], []
        if self.include_buffers:
            source = dict((_canonical(n), b) for n, b in model.named_buffers())
            buffers = [source[n].detach() for n in self._float_buffer_names]
            ema_buffers = dict((_canonical(n), b) for n, b in self.model.named_buffers())
            other_buffers = [(ema_buffers[n], b) for n, b in source.items() if not b.is_floating_point()]
        return params, buffers, other_buffers

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model` (the live, possibly DDP/compile-wrapped model)."""
        params, buffers, other_buffers = self._source(model)
        targets, sources = self._params, params
        if self.include_buffers:
            targets, sources = targets + self._float_buffers, sources + buffers
        # mul_ + add_ (rather than lerp_) is bit-identical to the official `ema.mul_(d).add_(p, alpha=1 - d)`.
        torch._foreach_mul_(targets, self.decay)
        torch._foreach_add_(targets, sources, alpha=1.0 - self.decay)
        for target, source in other_buffers:
            target.copy_(source)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers when tracked) into `model`."""
        params, buffers, _ = self._source(model)
        torch._foreach_copy_(params, self._params)
        if buffers:
            torch._foreach_copy_(buffers, self._float_buffers)

    def to(self, *args, **kwargs) -> EMA:
        self.model.to(*args, **kwargs)
        self._params = [p for _, p in self.model.named_parameters()]
        self._float_buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decay = state_dict["decay"]
        self.num_updates = state_dict["num_updates"]
        self.model.load_state_dict(state_dict["model"])
