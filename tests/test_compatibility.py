"""The supported-version table, the import-time warning, and setup.py reading the same table."""

import importlib.metadata
import warnings
from pathlib import Path

import pytest

from gear_hf import compatibility
from gear_hf.dependency_versions import CHECKED_AT_IMPORT, INSTALL_REQUIRES

ROOT = Path(__file__).resolve().parents[1]


def fake_versions(monkeypatch, **versions):
    real = importlib.metadata.version
    monkeypatch.setattr(compatibility.importlib.metadata, "version",
                        lambda name: versions.get(name) or real(name))


def test_installed_environment_is_supported():
    assert compatibility.unsupported_versions() == {}


def test_one_line_per_library_outside_its_range(monkeypatch):
    fake_versions(monkeypatch, transformers="6.1.0", diffusers="0.30.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compatibility.warn_if_unsupported()
    messages = sorted(str(w.message) for w in caught if w.category is compatibility.GEARCompatibilityWarning)
    assert len(messages) == 2
    assert "diffusers>=0.42" in messages[0] and "diffusers 0.30.0 is installed" in messages[0]
    assert "transformers<6,>=5.23" in messages[1] and "transformers 6.1.0 is installed" in messages[1]
    assert all("\n" not in m for m in messages)


def test_local_builds_and_prereleases_of_supported_versions_pass(monkeypatch):
    fake_versions(monkeypatch, torch="2.14.1+cu130", transformers="5.25.0.dev0")
    assert compatibility.unsupported_versions() == {}


def test_every_checked_library_has_a_range():
    assert set(CHECKED_AT_IMPORT) <= set(INSTALL_REQUIRES)


def test_setup_py_requirements_come_from_the_table(monkeypatch):
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    assert captured["install_requires"] == [name + spec for name, spec in INSTALL_REQUIRES.items()]
    assert {"pytest>=9.2", "deepspeed>=0.19.8", "torch-fidelity>=0.4"} <= set(captured["extras_require"]["dev"])


def test_lock_pins_every_requirement():
    """requirements/lock.txt (make lock) pins every package setup.py asks for, exactly once."""
    lock = ROOT / "requirements" / "lock.txt"
    if not lock.is_file():
        pytest.fail("requirements/lock.txt is missing: run `make lock`.")
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for name in INSTALL_REQUIRES:
        assert name.lower().replace("_", "-") in pins, f"{name} is not pinned in requirements/lock.txt"
