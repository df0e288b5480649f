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
