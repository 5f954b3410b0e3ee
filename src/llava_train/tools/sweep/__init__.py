"""Sweeps in wandb's YAML format: the file and its trials (`spec`), local runs and their summary (`run`)."""
