"""Vision-tower geometry: the one home of how many tokens an image becomes (data, plan, bench, FLOPs, processor).

`ImageGeometry` adds the anyres arithmetic of LLaVA-NeXT / OneVision (tokens from an image's size).

LLaVA-1.5 feeds the hidden state of one tower layer to the projector: CLIP's starts with a CLS token
that `patch` selection (`vision_feature_select_strategy="default"`) drops; SigLIP has none. One
336 px image through CLIP-L/14 is (336 // 14)^2 = 576 feature tokens; the tower itself runs 577.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llava_train.archs import DEFAULT_ASPECT_RATIO, anyres_max_patches, check_aspect_ratio

# model_type of vision configs whose encoder output starts with a CLS token, and of those without.
CLS_TOWERS = ("clip_vision_model",)
NO_CLS_TOWERS = ("siglip_vision_model",)
FEATURE_SELECTS = ("patch", "cls_patch")


def vision_config_of(config: Any) -> Any:
    """The vision part of a CLIP/SigLIP/LLaVA config (a full CLIPConfig or LlavaConfig holds it as `vision_config`)."""
    inner = getattr(config, "vision_config", None)
    return inner if inner is not None else config


def has_cls(vision_config: Any) -> bool:
    """Whether the tower's encoder output starts with a CLS token; unknown towers are an error listing the known."""
    model_type = getattr(vision_config_of(vision_config), "model_type", "")
    if model_type in CLS_TOWERS:
        return True
    if model_type in NO_CLS_TOWERS:
        return False
    known = ", ".join(CLS_TOWERS + NO_CLS_TOWERS)
    raise ValueError(f"unsupported vision tower config model_type {model_type!r}; supported: {known}")


def feature_select_strategy(vision_config: Any, feature_select: str) -> str:
    """transformers' `vision_feature_select_strategy` for our `model.vision_feature_select`.

    `default` drops the first (CLS) token, `full` keeps every token. CLIP: `patch` -> `default`,
    `cls_patch` -> `full`. SigLIP has no CLS token, so `patch` -> `full` and `cls_patch` is an error.
    """
    if feature_select not in FEATURE_SELECTS:
        raise ValueError(f"unknown vision_feature_select {feature_select!r}; valid: {', '.join(FEATURE_SELECTS)}")
    if has_cls(vision_config):
        return "default" if feature_select == "patch" else "full"
    if feature_select == "cls_patch":
        raise ValueError("vision_feature_select=cls_patch needs a vision tower with a CLS token; SigLIP has none")
    return "full"


def image_size(vision_config: Any) -> int:
    """Side of the square crop the tower takes, in pixels."""
    size = vision_config_of(vision_config).image_size
    return int(size if isinstance(size, int) else size[0])


def patches_per_side(vision_config: Any) -> int:
    """Patches along one side of a crop: image_size // patch_size (24 for CLIP-L/14-336)."""
    return image_size(vision_config) // int(vision_config_of(vision_config).patch_size)


def tower_tokens(vision_config: Any) -> int:
    """Tokens the tower's encoder runs per crop (what its FLOPs scale with): patches, plus CLIP's CLS."""
    return patches_per_side(vision_config) ** 2 + (1 if has_cls(vision_config) else 0)


def num_additional_image_tokens(vision_config: Any) -> int:
    """Tokens the tower adds besides the patches (LlavaProcessor's `num_additional_image_tokens`): CLS or none."""
    return 1 if has_cls(vision_config) else 0


def image_tokens(vision_config: Any, feature_select: str) -> int:
    """Feature tokens one image becomes in the LM's input (LLaVA-1.5: one crop per image).

    576 for CLIP-L/14 at 336 px with `patch`; 577 with `cls_patch`; 729 for SigLIP-so400m/14 at 384 px.
    """
    strategy = feature_select_strategy(vision_config, feature_select)  # also validates the selection
    keeps_cls = has_cls(vision_config) and strategy == "full"
    return patches_per_side(vision_config) ** 2 + (1 if keeps_cls else 0)


# -- per-image token counts: the one formula the data side, the model checks, plan and FLOPs share ----------

# Anyres grids in units of the tower's crop S, as (rows, cols): LLaVA-NeXT's five (its scripts and
# transformers' LlavaNextConfig: 336x672, 672x336, 672x672, 1008x336, 336x1008 for S = 336) and
# OneVision's "(1x1),...,(6x6)" (transformers' LlavaOnevisionConfig default for S = 384).
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRIDS = tuple((i, j) for i in range(1, 7) for j in range(1, 7))


def default_pinpoints(arch: str, crop: int) -> list[list[int]]:
    """The arch's anyres pinpoints as [height, width] pixels for a tower whose crop is `crop` px ([] for llava)."""
    grids = {"llava": (), "llava_next": NEXT_GRIDS, "llava_onevision": ONEVISION_GRIDS}[arch]
    return [[rows * crop, cols * crop] for rows, cols in grids]


def select_best_resolution(height: int, width: int, pinpoints: Any) -> tuple[int, int]:
    """The pinpoint (height, width) an image is resized into: transformers' own choice (most effective, least
    wasted pixels), so the data side never disagrees with the model."""
    from transformers.image_processing_utils import select_best_resolution as hf_select

    return tuple(hf_select((height, width), [list(p) for p in pinpoints]))  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageGeometry:
    """How many LM tokens (and tower crops) an image, a multi-image sample's image or a video becomes.

    arch: `model.arch`. crop: the tower's square input side S in px. patches: P = S // patch_size.
    base_tokens: LM tokens of one crop (P*P; +1 when CLIP's CLS is kept). tower_tokens: tokens the
    tower encodes per crop. pinpoints: anyres grids, (height, width) px. max_num_patches: N of
    OneVision's `anyres_max_N`. aspect_ratio: `data.image_aspect_ratio` (how images are preprocessed).

    llava: every image is one crop, `base_tokens`. llava_next / llava_onevision (single image):
    base crop + the best pinpoint's grid of crops; the grid's P x P feature maps are tiled, the
    padding the aspect-preserving resize added is cut off (transformers' `unpad_image`, with its
    round(x, 7)), OneVision then downsamples grids over N crops' worth (ratio = sqrt(h*w / (N*P*P)),
    applied when > 1.1, as `int(h // ratio)`), and one image-newline embedding ends every grid row:
    tokens = base + rows * cols + rows. OneVision multi-image samples: each image is its base crop +
    one newline. OneVision video: F frames pooled to ceil(P/2)^2 tokens each + one newline.
    """

    arch: str
    crop: int
    patches: int
    base_tokens: int
    tower_tokens: int
    pinpoints: tuple[tuple[int, int], ...] = ()
    max_num_patches: int | None = None
    aspect_ratio: str = "pad"

    @property
    def size_dependent(self) -> bool:
        """Whether the token count depends on the image's size (the scan must then read image headers)."""
        return self.arch != "llava"

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of grid crops the best pinpoint gives an image of this size."""
        best_h, best_w = select_best_resolution(height, width, self.pinpoints)
        return best_h // self.crop, best_w // self.crop

    def image_tokens(self, height: int, width: int, images_in_sample: int = 1) -> int:
        """LM tokens of one image of `height` x `width` px (as decoded, before any preprocessing)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if self.arch == "llava":
            return self.base_tokens
        if self.arch == "llava_onevision" and images_in_sample > 1:
            return self.base_tokens + 1
        rows, cols = self.grid(height, width)
        cur_h, cur_w = rows * self.patches, cols * self.patches
        if width / height > cur_w / cur_h:  # wider than the grid: rows of padding were added
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:  # taller (or the same shape): columns of padding were added
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        if self.max_num_patches is not None:
            ratio = math.sqrt(cur_h * cur_w / (self.max_num_patches * self.patches**2))
            if ratio > 1.1:
                cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        return self.base_tokens + cur_h * cur_w + cur_h

    def crops(self, height: int, width: int, images_in_sample: int = 1) -> int:
        """Crops the tower encodes for one image: 1, or base + grid (transformers' image_size_to_num_patches)."""
        if self.arch == "llava" or (self.arch == "llava_onevision" and images_in_sample > 1):
            return 1
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def video_tokens(self, frames: int) -> int:
        """LM tokens of a video of `frames` frames (OneVision: bilinear pooling to ceil(P/2)^2 per frame + 1)."""
        if self.arch != "llava_onevision":
            raise ValueError(f"model.arch={self.arch} has no video input; use llava_onevision")
        return frames * math.ceil(self.patches / 2) ** 2 + 1

    def max_image_tokens(self) -> int:
        """The most tokens one image can become (plan, bench): llava's fixed count, else the largest over
        images exactly the size of a pinpoint (no unpadding); OneVision's downsampling caps the rest, so
        other sizes can exceed it by at most one grid row/column of tokens."""
        if self.arch == "llava":
            return self.base_tokens
        return max(self.image_tokens(h, w) for h, w in self.pinpoints)

    def max_crops(self) -> int:
        """The most crops the tower encodes for one image: 1 for llava, else base + the largest grid."""
        if self.arch == "llava":
            return 1
        return 1 + max((h // self.crop) * (w // self.crop) for h, w in self.pinpoints)

    def describe(self) -> str:
        """One line for logs: `576 per image` or `anyres (base 576 + grid, max 2928 per image)`."""
        if self.arch == "llava":
            return f"{self.base_tokens} per image"
        return f"{self.aspect_ratio} (base {self.base_tokens} + grid, up to ~{self.max_image_tokens()} per image)"


def image_geometry(
    arch: str,
    vision_config: Any,
    feature_select: str,
    image_aspect_ratio: str | None = None,
    pinpoints: Any = None,
) -> ImageGeometry:
    """The ImageGeometry of a run (`model.arch`, the tower, `model.vision_feature_select`,
    `data.image_aspect_ratio`, `model.image_grid_pinpoints`; None = the arch's defaults)."""

    aspect = image_aspect_ratio or DEFAULT_ASPECT_RATIO[arch]
    check_aspect_ratio(arch, aspect)
    crop = image_size(vision_config)
    if arch != "llava" and has_cls(vision_config) and feature_select_strategy(vision_config, feature_select) == "full":
        # transformers' anyres packing views each crop's features as P x P: a kept CLS token breaks it.
        raise ValueError(f"model.arch={arch} needs vision_feature_select=patch with a CLS tower (CLIP)")
    points = default_pinpoints(arch, crop) if pinpoints is None else [list(p) for p in pinpoints]
    if arch != "llava":
        bad = [p for p in points if p[0] % crop or p[1] % crop]
        if bad:
            raise ValueError(f"model.image_grid_pinpoints {bad} are not multiples of the tower's crop {crop} px")
    return ImageGeometry(
        arch=arch,
        crop=crop,
        patches=patches_per_side(vision_config),
        base_tokens=image_tokens(vision_config, feature_select),
        tower_tokens=tower_tokens(vision_config),
        pinpoints=tuple((int(h), int(w)) for h, w in points) if arch != "llava" else (),
        max_num_patches=anyres_max_patches(aspect),
        aspect_ratio=aspect,
    )


def run_geometry(cfg: Any, vision_config: Any) -> ImageGeometry:
    """`image_geometry` of a RunConfig and its tower's config."""
    return image_geometry(
        cfg.model.arch,
        vision_config,
        cfg.model.vision_feature_select,
        cfg.data.image_aspect_ratio,
        cfg.model.image_grid_pinpoints,
    )
