"""gear_hf: GEAR (Guided End-to-End AutoRegression) on the Hugging Face stack."""

__version__ = "0.1.0.dev0"
