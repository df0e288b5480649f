"""The gear_hf version (one home: `setup.py` reads it, `gear_hf.__version__` re-exports it)."""

__version__ = "0.1.0.dev0"
