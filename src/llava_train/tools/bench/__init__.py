"""The throughput benchmark: presets and synthetic mixes (`presets`), the measured runs (`run`)."""

from llava_train.tools.bench.presets import (
    DEFAULT_MODES,
    MODES,
    PRESETS,
    BenchPreset,
    ModeSpec,
    SyntheticMix,
    get_preset,
    image_tokens_per_image,
    parse_modes,
    synthetic_layout,
)
from llava_train.tools.bench.run import bench, build_bench_model, run_mode, run_rounds, summary

__all__ = [
    "DEFAULT_MODES",
    "MODES",
    "PRESETS",
    "BenchPreset",
    "ModeSpec",
    "SyntheticMix",
    "bench",
    "build_bench_model",
    "get_preset",
    "image_tokens_per_image",
    "parse_modes",
    "run_mode",
    "run_rounds",
    "summary",
    "synthetic_layout",
]
