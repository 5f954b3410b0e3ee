"""The throughput benchmark: presets and modes (`presets`), synthetic mixes (`mix`), the measured runs (`run`)."""

from llava_train.tools.bench.mix import SyntheticMix, crops_per_image, image_tokens_per_image, synthetic_layout
from llava_train.tools.bench.presets import (
    DEFAULT_MODES,
    MODES,
    PRESETS,
    BenchPreset,
    ModeSpec,
    get_preset,
    parse_modes,
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
    "crops_per_image",
    "get_preset",
    "image_tokens_per_image",
    "parse_modes",
    "run_mode",
    "run_rounds",
    "summary",
    "synthetic_layout",
]
