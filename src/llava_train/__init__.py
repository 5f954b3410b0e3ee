"""llava-train: LLaVA-style vision-language model training on the Hugging Face stack."""

__version__ = "0.1.0"
