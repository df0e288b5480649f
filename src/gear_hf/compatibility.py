"""One warning line per core library installed outside the range gear_hf supports (see `dependency_versions`)."""

from __future__ import annotations

import importlib.metadata
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .dependency_versions import CHECKED_AT_IMPORT, INSTALL_REQUIRES


class GEARCompatibilityWarning(UserWarning):
    """A library gear_hf builds on is installed in a version outside the supported range."""


def unsupported_versions(packages=CHECKED_AT_IMPORT) -> dict[str, tuple[str, str]]:
    """{package: (installed version, supported range)} for each installed package outside its range."""
    found = {}
    for name in packages:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a missing package fails loudly at its import
        supported = SpecifierSet(INSTALL_REQUIRES[name])
        # Local builds (2.14.1+cu130) and pre-releases of a supported release are fine.
        if Version(Version(installed).base_version) not in supported:
            found[name] = (installed, str(supported))
    return found


def warn_if_unsupported() -> None:
    for name, (installed, supported) in unsupported_versions().items():
        warnings.warn(
            f"gear_hf supports {name}{supported} but {name} {installed} is installed; expect breakage "
            f"(pip install '{name}{supported}', or see 'Compatibility' in the gear_hf README).",
            GEARCompatibilityWarning, stacklevel=2,
        )
