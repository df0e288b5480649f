"""Reading ADM-format `.npz` files without loading them whole: a 50k × 256² sample batch is 9.8 GB."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np


@dataclass
class NpzArrayInfo:
    shape: tuple[int, ...]
    dtype: np.dtype


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in an `.npz` (without reading them)."""
    _check_file(path)
    with zipfile.ZipFile(path) as archive:
        return [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]


def _check_file(path) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not an .npz archive (expected the ADM format: np.savez(path, arr_0=images)).")


def _open_member(archive: zipfile.ZipFile, path, key: str):
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = [n.removesuffix(".npy") for n in archive.namelist()]
        raise KeyError(f"{path} has no array {key!r} (it has {keys}).")
    handle = archive.open(name)
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    else:  # format 3.0 (utf-8 field names) has no public header reader; numpy writes it only for such dtypes
        handle.close()
        raise ValueError(f"{path}: {key} uses the unsupported .npy format 3.0; save it with np.savez from plain "
                         "uint8 / float arrays (format 1.0 or 2.0).")
    return handle, tuple(shape), fortran_order, dtype


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> NpzArrayInfo:
    """Shape and dtype of one array of an `.npz`, from its header only."""
    _check_file(path)
    with zipfile.ZipFile(path) as archive:
        handle, shape, _, dtype = _open_member(archive, path, key)
        handle.close()
    return NpzArrayInfo(shape=shape, dtype=dtype)


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 64):
    """Yield consecutive batches (views along axis 0) of one array of an `.npz`, streaming from the archive."""
    _check_file(path)
    with zipfile.ZipFile(path) as archive:
        handle, shape, fortran_order, dtype = _open_member(archive, path, key)
        if fortran_order or dtype.hasobject:  # rare layouts: fall back to a full read
            handle.close()
            array = np.load(path)[key]
            for start in range(0, len(array), batch_size):
                yield array[start:start + batch_size]
            return
        with handle:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = handle.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise ValueError(f"{path}: {key} is truncated (the file is incomplete).")
                yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))


class NpzBatches:
    """An iterable of batches with a length (for progress bars)."""

    def __init__(self, path, key: str = "arr_0", batch_size: int = 64):
        self.path, self.key, self.batch_size = path, key, batch_size
        self.info = npz_array_info(path, key)

    def __len__(self) -> int:
        return -(-self.info.shape[0] // self.batch_size)

    def __iter__(self):
        return iter_npz_batches(self.path, self.key, self.batch_size)


__all__ = ["NpzArrayInfo", "NpzBatches", "iter_npz_batches", "npz_array_info", "npz_keys"]
