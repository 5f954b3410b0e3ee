"""Images: paths inside the image folder, RGB loading, LLaVA's pad-to-square, and the image processor call.

How many tokens an image becomes is a model fact: `model.vision`.
"""

from __future__ import annotations

import os
from typing import Any

# -- files -------------------------------------------------------------------------------------


def resolve_image_path(image_folder: str | None, rel: str) -> str:
    """`image_folder/rel`; an absolute `rel` or one leaving `image_folder` (`..`) is BadSample(image_path_escapes)."""
    from llava_train.data.errors import BadSample

    if not isinstance(rel, str) or not rel:
        raise BadSample("missing_image", f"image path must be a non-empty string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise BadSample("image_path_escapes", f"image path {rel!r} is absolute")
    base = os.path.abspath(image_folder or ".")
    full = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, full]) != base:
        raise BadSample("image_path_escapes", f"image path {rel!r} leaves image_folder {image_folder!r}")
    return full


def verify_image(path: str) -> None:
    """Check that an image file exists and decodes (PIL verify); raises BadSample otherwise."""
    from PIL import Image

    from llava_train.data.errors import BadSample

    if not os.path.isfile(path):
        raise BadSample("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample("corrupt_image", f"cannot decode {path}: {e}") from e


def load_image(path: str) -> Any:
    """Open an image file as RGB (verify, then a fresh open and full decode); BadSample on failure."""
    from PIL import Image

    from llava_train.data.errors import BadSample

    verify_image(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise BadSample("corrupt_image", f"cannot decode {path}: {e}") from e


# -- preprocessing -----------------------------------------------------------------------------

ASPECT_RATIOS = ("pad", "resize", "crop")


def expand2square(img: Any, background: tuple[int, int, int]) -> Any:
    """Pad an image to a square with `background`, the image centred (LLaVA's expand2square)."""
    from PIL import Image

    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def processor_output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the processor's pixel_values (its crop size when it centre-crops)."""
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        if _size_field(crop, "height"):
            return _size_field(crop, "height"), _size_field(crop, "width")  # type: ignore[return-value]
    size = image_processor.size
    if _size_field(size, "height"):
        return _size_field(size, "height"), _size_field(size, "width")  # type: ignore[return-value]
    edge = _size_field(size, "shortest_edge")
    if edge:
        return edge, edge
    raise ValueError(f"cannot tell the output size of image processor {type(image_processor).__name__}")


def mean_color(image_processor: Any) -> tuple[int, int, int]:
    """The processor's mean as an RGB colour, int(255 * mean) per channel ((122, 116, 104) for CLIP)."""
    return tuple(int(255 * m) for m in image_processor.image_mean)  # type: ignore[return-value]


def preprocess_images(images: list[Any], image_processor: Any, image_aspect_ratio: str) -> Any:
    """RGB PIL images -> pixel_values FloatTensor [n, 3, H, W].

    pad: expand to a square with the processor mean colour, centred, then the processor (LLaVA-1.5).
    resize: squash to the processor's output size, then the processor (its resize/crop are no-ops).
    crop: the processor's own resize + centre crop.
    """
    from PIL import Image

    if image_aspect_ratio not in ASPECT_RATIOS:
        raise KeyError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}")
    if image_aspect_ratio == "pad":
        background = mean_color(image_processor)
        images = [expand2square(img, background) for img in images]
    elif image_aspect_ratio == "resize":
        height, width = processor_output_size(image_processor)
        images = [img.resize((width, height), Image.Resampling.BICUBIC) for img in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.float()
