"""The model archs as data (torch-free: the config layer validates with it): names, each arch's image
aspect-ratio modes and default, and the anyres pinpoint rule. How many tokens an image becomes is
`model.vision.ImageGeometry`.
"""

from __future__ import annotations

from typing import Any

from llava_train.config_io import ConfigError

ARCHS = ("llava", "llava_next", "llava_onevision")
# data.image_aspect_ratio per arch: LLaVA-1.5's one crop per image; NeXT's anyres grid; OneVision's anyres_max_N.
IMAGE_ASPECT_RATIOS = ("pad", "resize", "crop")
ANYRES = "anyres"
ANYRES_MAX = "anyres_max_"
DEFAULT_ASPECT_RATIO = {"llava": "pad", "llava_next": ANYRES, "llava_onevision": "anyres_max_9"}


def anyres_max_patches(image_aspect_ratio: str) -> int | None:
    """N of `anyres_max_N` (OneVision's cap on grid crops before downsampling), None for other values."""
    if image_aspect_ratio.startswith(ANYRES_MAX):
        tail = image_aspect_ratio[len(ANYRES_MAX) :]
        if tail.isdigit() and int(tail) > 0:
            return int(tail)
    return None


def check_aspect_ratio(arch: str, value: str) -> None:
    """`data.image_aspect_ratio` must suit `model.arch`: pad/resize/crop for llava, anyres for llava_next,
    anyres_max_N for llava_onevision (transformers' OneVision always downsamples to N crops)."""
    if arch == "llava":
        if value not in IMAGE_ASPECT_RATIOS:
            choices = ", ".join(IMAGE_ASPECT_RATIOS)
            raise ConfigError(f"data.image_aspect_ratio={value!r} is not valid; choose one of: {choices}")
    elif arch == "llava_next":
        if value != ANYRES:
            raise ConfigError(f"data.image_aspect_ratio={value!r} is not valid with model.arch=llava_next; use anyres")
    elif anyres_max_patches(value) is None:
        raise ConfigError(
            f"data.image_aspect_ratio={value!r} is not valid with model.arch=llava_onevision; use anyres_max_N "
            "(N >= 1, OneVision's recipe: anyres_max_9)"
        )


def check_pinpoints(pairs: Any) -> list[list[int]]:
    """`model.image_grid_pinpoints` as a list of [height, width] lists; anything else is a ConfigError."""
    ok = isinstance(pairs, (list, tuple)) and bool(pairs)
    ok = ok and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int and v > 0 for v in p) for p in pairs
    )
    if not ok:
        raise ConfigError(
            f"model.image_grid_pinpoints must be a non-empty list of [height, width] pixel pairs, got {pairs!r}"
        )
    return [list(p) for p in pairs]
