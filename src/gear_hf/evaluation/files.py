"""Atomic file writes: a killed evaluation leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def save_atomically(write: Callable[[Path], object], path: str | os.PathLike) -> None:
    """`write(tmp)` to a temporary name beside `path`, then `os.replace` it onto `path`. The temporary name keeps
    the suffix (`name.tmp.npz`, `name.tmp.png`) so writers that infer the format from it (PIL, matplotlib) work."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def savez_atomically(path: str | os.PathLike, **arrays) -> None:
    """`np.savez(path, **arrays)` atomically, through a file handle (a path not ending in .npz gets no suffix)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    save_atomically(write, path)


__all__ = ["save_atomically", "savez_atomically"]
