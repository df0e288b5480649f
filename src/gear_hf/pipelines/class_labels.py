"""Class names of a class-conditional pipeline: the `id2label` table, name → id lookup (case-insensitive, any
comma-separated synonym, with suggestions for typos), and turning ids / names / tensors into checked class ids."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names in the standard index order (sorted WordNet ids, as ImageFolder and the
    ADM reference batch use), e.g. 207 -> "golden retriever". Read offline from timm's bundled class info."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {i: info.index_to_description(i) for i in range(info.num_classes())}


NAMED_LABEL_SETS = {"imagenet-1k": imagenet_id2label}


def normalize_id2label(id2label: Mapping | str | None, num_classes: int, source: str) -> dict[int, str] | None:
    """`{class_id: name}` with int keys in [0, num_classes), sorted; a named set ("imagenet-1k") is expanded."""
    if id2label is None:
        return None
    if isinstance(id2label, str):
        if id2label not in NAMED_LABEL_SETS:
            raise ValueError(f"Unknown label set {id2label!r}; pass a dict {{class_id: name}} or one of "
                             f"{sorted(NAMED_LABEL_SETS)}.")
        id2label = NAMED_LABEL_SETS[id2label]()
    if not isinstance(id2label, Mapping):
        raise TypeError(f"{source} must be a dict {{class_id: name}}, got {type(id2label).__name__}.")
    normalized = {}
    for key, name in id2label.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{source} keys must be class ids (ints), got {key!r}.") from None
        if not 0 <= class_id < num_classes:
            raise ValueError(f"{source} has class id {class_id}, outside [0, {num_classes - 1}] for this "
                             f"generator ({num_classes} classes).")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}[{class_id}] must be a non-empty string, got {name!r}.")
        normalized[class_id] = name
    return dict(sorted(normalized.items()))


def is_placeholder_id2label(id2label: Mapping | None) -> bool:
    """transformers configs default to {0: "LABEL_0", 1: "LABEL_1"}: not real class names."""
    return not id2label or all(str(name) == f"LABEL_{int(key)}" for key, name in id2label.items())


def name_table(id2label: Mapping[int, str]) -> dict[str, list[int]]:
    """Lower-cased name (the full string and each comma-separated synonym) -> class ids carrying it."""
    table: dict[str, list[int]] = {}
    for class_id, name in id2label.items():
        for synonym in dict.fromkeys(n.strip().lower() for n in [name, *name.split(",")]):
            table.setdefault(synonym, []).append(class_id)
    return table


def full_name_table(id2label: Mapping[int, str]) -> dict[str, list[int]]:
    """Lower-cased full name (the whole `id2label` string) -> class ids carrying it."""
    table: dict[str, list[int]] = {}
    for class_id, name in id2label.items():
        table.setdefault(name.strip().lower(), []).append(class_id)
    return table


def name_resolver(id2label: Mapping[int, str], num_classes: int) -> Callable[[str], int]:
    """A function mapping one class name (case-insensitive, any comma-separated synonym) to its class id; the name
    tables are built once here. A class's full name wins over another class's synonym (ImageNet 474 "cardigan" vs
    264 "Cardigan, Cardigan Welsh corgi"); a name shared otherwise is ambiguous."""
    if not id2label:
        raise ValueError(
            "This pipeline has no class names: pass integer class ids, or set names with "
            "GEARPipeline(..., id2label={0: 'tench', ...} or 'imagenet-1k') / pipe.id2label = {...}."
        )
    full_names, table = full_name_table(id2label), name_table(id2label)

    def resolve(name: str) -> int:
        key = name.strip().lower()
        if len(full_names.get(key, ())) == 1:
            return full_names[key][0]
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"Unknown class name {name!r}.{hint} See pipe.id2label for the {len(id2label)} "
                             f"names, or pass integer class ids in [0, {num_classes - 1}]. (Prompts need a "
                             "text-to-image pipeline.)")
        if len(table[key]) > 1:
            matches = table[key]
            raise ValueError(f"Class name {name!r} is ambiguous: classes {matches} "
                             f"({', '.join(repr(id2label[i]) for i in matches)}). Pass the class id instead.")
        return table[key][0]

    return resolve


def label_ids(label: str | Sequence[str], id2label: Mapping[int, str], num_classes: int) -> list[int]:
    """Map class names (case-insensitive, any comma-separated synonym) to class ids (see `name_resolver`)."""
    resolve = name_resolver(id2label, num_classes)
    return [resolve(name) for name in ([label] if isinstance(label, str) else label)]


def resolve_class_labels(class_labels: Any, id2label: Mapping[int, str], num_classes: int) -> list[int]:
    """Class ids from an int, a name, a list of them, or a 0-D / 1-D integer tensor or array (checked ranges)."""
    if isinstance(class_labels, torch.Tensor):
        if class_labels.is_floating_point() or class_labels.is_complex():
            raise ValueError(f"class_labels as a tensor must hold integer class ids, got {class_labels.dtype}.")
        class_labels = class_labels.cpu().numpy()
    if isinstance(class_labels, np.ndarray):
        if class_labels.ndim > 1 or not np.issubdtype(class_labels.dtype, np.integer):
            raise ValueError(f"class_labels as an array must be 0-D or 1-D integers, got {class_labels.dtype} "
                             f"of shape {tuple(class_labels.shape)}.")
        class_labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (str, numbers.Integral)):
        class_labels = [class_labels]
    elif not isinstance(class_labels, Sequence):
        raise TypeError(f"class_labels must be an int, a class name, or a list of them; got "
                        f"{type(class_labels).__name__}.")
    if len(class_labels) == 0:
        raise ValueError("class_labels is empty; pass at least one class id or name.")
    ids, resolve = [], None
    for label in class_labels:
        if isinstance(label, str):
            resolve = resolve or name_resolver(id2label, num_classes)  # built once per call
            ids.append(resolve(label))
        elif isinstance(label, numbers.Integral) and not isinstance(label, (bool, np.bool_)):
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"Class id {int(label)} is out of range: this generator has "
                                 f"{num_classes} classes, pass ids in [0, {num_classes - 1}].")
            ids.append(int(label))
        else:
            raise TypeError(f"Each class label must be an int id or a class name (str), got {label!r}.")
    return ids


__all__ = ["imagenet_id2label", "normalize_id2label", "is_placeholder_id2label", "name_table", "full_name_table",
           "name_resolver", "label_ids", "resolve_class_labels", "NAMED_LABEL_SETS"]
