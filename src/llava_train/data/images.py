"""Images and video frames: image references (files, embedded bytes, tar members), paths inside the image folder,
header sizes, RGB loading, LLaVA's pad-to-square,
the anyres image processor call (NeXT / OneVision) and video frame tensors.

How many tokens an image becomes is a model fact: `model.vision`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.archs import IMAGE_ASPECT_RATIOS
from llava_train.data.errors import BadSample

# -- files -------------------------------------------------------------------------------------


def resolve_image_path(image_folder: str | None, rel: str) -> str:
    """The real path of `image_folder/rel`: an absolute `rel` or one leaving `image_folder` (`..`) is
    BadSample(image_path_escapes); one whose real path (symbolic links followed, in the file or any folder
    above it) lies outside the folder's real path is BadSample(image_symlink_escapes), so no file outside the
    image folder is ever opened (data sets arrive as archives, and `tar x` recreates their links)."""

    if not isinstance(rel, str) or not rel:
        raise BadSample("missing_image", f"image path must be a non-empty string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise BadSample("image_path_escapes", f"image path {rel!r} is absolute")
    base = os.path.abspath(image_folder or ".")
    full = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, full]) != base:
        raise BadSample("image_path_escapes", f"image path {rel!r} leaves image_folder {image_folder!r}")
    return check_inside(image_folder, full, rel)


def check_inside(image_folder: str | None, path: str, rel: str) -> str:
    """The real path of `path` when it lies inside the real path of `image_folder` (the folder itself may be a
    link), else BadSample(image_symlink_escapes)."""

    base_real = os.path.realpath(image_folder or ".")
    real = os.path.realpath(path)
    if os.path.commonpath([base_real, real]) != base_real:
        raise BadSample(
            "image_symlink_escapes", f"image path {rel!r} is a link to {real}, outside image_folder {image_folder!r}"
        )
    return real


@dataclass(frozen=True)
class ImageRef:
    """One image of a row, wherever it lives: a file, encoded bytes embedded in the data (an HF `Image` column),
    a member of a tar shard (read on demand), or an already decoded PIL image.

    Every image path of the data layer (scan, training, validate, inspect, predict) takes an ImageRef, so an
    embedded image gives the same size, pixels and bad-row reasons as the same image on disk.
    path: the resolved file (file images). data: the encoded bytes (embedded images).
    member: (tar file, byte offset, size) of a tar member. pil: a decoded image. name: how messages name it.
    """

    path: str | None = None
    data: bytes | None = None
    member: tuple[str, int, int] | None = None
    pil: Any = None
    name: str = ""

    def __str__(self) -> str:
        return self.name or self.path or "<embedded image>"

    def encoded(self) -> bytes | None:
        """The encoded bytes of an embedded or tar image (None for a file or a PIL image)."""
        if self.member is not None:
            tar, offset, size = self.member
            with open(tar, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
            if len(data) != size:
                raise BadSample("missing_image", f"{self}: {tar} ends before byte {offset + size}")
            return data
        return self.data

    def open(self) -> Any:
        """A lazy `PIL.Image.open` of the image (reads the header only until pixels are needed)."""
        from PIL import Image

        if self.path is not None:
            return Image.open(self.path)
        return Image.open(io.BytesIO(self.encoded() or b""))


ImageLike = str | ImageRef


def as_image_ref(image: ImageLike) -> ImageRef:
    """A path string (already resolved) as an ImageRef; an ImageRef as it is."""
    return image if isinstance(image, ImageRef) else ImageRef(path=image, name=image)


def image_ref(value: Any, image_folder: str | None, where: str = "image") -> ImageRef:
    """One image value of a record as an ImageRef: a path string (relative to `image_folder`), an HF `Image`
    struct `{"bytes", "path"}` (the bytes win; bytes None = a file path, as `to_parquet` writes local files),
    raw bytes, a PIL image or an ImageRef (tar members). An empty value is BadSample(missing_image)."""

    if isinstance(value, ImageRef):
        return value
    if isinstance(value, str):
        path = resolve_image_path(image_folder, value)
        return ImageRef(path=path, name=path)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, rel = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(data=_struct_bytes(data, where), name=f"embedded {where}" + (f" ({rel})" if rel else ""))
        if rel:
            return image_ref(rel, image_folder, where)
        raise BadSample("missing_image", f"embedded {where} has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadSample("missing_image", f"embedded {where} is empty")
        return ImageRef(data=bytes(value), name=f"embedded {where}")
    if hasattr(value, "convert") and hasattr(value, "size"):  # a decoded PIL image
        return ImageRef(pil=value, name=f"decoded {where}")
    raise BadSample("missing_image", f"{where} must be a path, an image struct or bytes, got {type(value).__name__}")


def _struct_bytes(data: Any, where: str) -> bytes:
    """The encoded bytes of an image struct: bytes as they are, base64 text (a JSON dump of an HF `Image` column
    holds that) decoded; any other type is BadSample (never `bytes(value)`: `bytes(10**11)` allocates 100 GB)."""
    import base64
    import binascii

    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadSample("corrupt_image", f"embedded {where}: `bytes` is text but not base64 ({e})") from e
    raise BadSample(
        "corrupt_image", f"embedded {where}: `bytes` must be bytes or base64 text, got {type(data).__name__}"
    )


# What the scan and training open: PIL's other formats are never tried (EPS runs Ghostscript on its data).
# MPO is the multi-picture JPEG that phone cameras write.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an image's header size, checked before any pixel is decoded: under `pad` an image becomes a
    square canvas of its longest side (a 143-byte 20000x1 PNG is a 1.1 GB canvas)."""

    max_side: int = 10000
    max_aspect_ratio: float = 50.0

    def check(self, ref: Any, width: int, height: int) -> None:
        """BadSample(image_too_large) when a side or the aspect ratio is over its bound."""

        if width <= 0 or height <= 0:
            raise BadSample("corrupt_image", f"{ref} has size {width}x{height}")
        if max(width, height) > self.max_side:
            raise BadSample("image_too_large", f"{ref} is {width}x{height}: a side over {self.max_side}")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise BadSample(
                "image_too_large", f"{ref} is {width}x{height}: aspect ratio over {self.max_aspect_ratio:g}"
            )


def _open_allowed(ref: ImageRef) -> Any:
    """`ref.open()` restricted to IMAGE_FORMATS; an image of another format is BadSample(image_format), bytes of
    no format BadSample(corrupt_image)."""
    from PIL import Image, UnidentifiedImageError

    source = ref.path if ref.path is not None else io.BytesIO(ref.encoded() or b"")
    Image.init()  # registers every plugin (`formats` names must be registered)
    try:
        return Image.open(source, formats=[f for f in IMAGE_FORMATS if f in Image.OPEN])
    except UnidentifiedImageError:
        pass
    except Exception as e:  # a known format's header, broken (PIL raises many types)
        raise BadSample("corrupt_image", f"cannot decode {ref}: {e}") from e
    # Only to name what it is: opening reads a header, never the data (nothing here is decoded).
    try:
        with Image.open(source if ref.path is not None else io.BytesIO(ref.encoded() or b"")) as other:
            found = other.format
    except Exception:
        found = None
    if found:
        raise BadSample("image_format", f"{ref} is {found}; allowed: {', '.join(IMAGE_FORMATS)}")
    raise BadSample("corrupt_image", f"cannot decode {ref}: not a {', '.join(IMAGE_FORMATS)} image")


def verify_image(image: ImageLike, verify: bool = True, limits: ImageLimits | None = None) -> tuple[int, int]:
    """(height, width) of an image from its header, after checking that it exists, is of an allowed format
    (IMAGE_FORMATS) and within `limits`, and (with `verify`) that its pixels decode in full (a truncated JPEG or
    a PNG with a broken deflate stream is BadSample(corrupt_image); PIL's own verify passes both). The size is the
    decoded image's (no EXIF rotation: neither LLaVA nor transformers' processors apply it, and embedded images
    are read the same way), the one anyres token counts use."""
    return _read(image, verify, limits or ImageLimits())[0]


def load_image(image: ImageLike, limits: ImageLimits | None = None) -> Any:
    """Open an image (file, embedded bytes, tar member) as RGB, decoded once, with the checks of verify_image;
    BadSample on failure."""
    return _read(image, True, limits or ImageLimits(), rgb=True)[1]


def _read(ref_like: ImageLike, decode: bool, limits: ImageLimits, rgb: bool = False) -> tuple[tuple[int, int], Any]:

    ref = as_image_ref(ref_like)
    if ref.pil is not None:
        width, height = ref.pil.size
        limits.check(ref, width, height)
        return (height, width), ref.pil.convert("RGB") if rgb else None
    if ref.path is not None and not os.path.isfile(ref.path):
        raise BadSample("missing_image", f"image file not found: {ref.path}")
    img = _open_allowed(ref)
    try:
        with img:
            width, height = img.size
            limits.check(ref, width, height)
            if not decode:
                return (height, width), None
            img.load()
            return (height, width), img.convert("RGB") if rgb else None
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample("corrupt_image", f"cannot decode {ref}: {e}") from e


def save_image(image: ImageLike, stem: str | os.PathLike) -> str:
    """Write an image to `stem` + its format's suffix, as stored (the file's or embedded bytes unchanged; a
    decoded PIL image as PNG); returns the path written (`data inspect --images`)."""
    ref = as_image_ref(image)
    if ref.pil is not None:
        path = f"{os.fspath(stem)}.png"
        ref.pil.save(path)
        return path
    with _open_allowed(ref) as img:
        suffix = {"JPEG": ".jpg"}.get(img.format or "", f".{(img.format or 'bin').lower()}")
    data = ref.encoded() if ref.path is None else Path(ref.path).read_bytes()
    path = f"{os.fspath(stem)}{suffix}"
    with open(path, "wb") as f:
        f.write(data or b"")
    return path


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def video_frame_paths(image_folder: str | None, video: Any, frames: int) -> list[str]:
    """`frames` frame files sampled uniformly from a video given as a folder of frame images (sorted by name)
    or a list of frame files, relative to `image_folder` (as LLaVA-NeXT: np.linspace(0, n - 1, frames),
    floored; a video with fewer frames repeats some). Video files are BadSample(bad_video)."""
    import numpy as np

    if isinstance(video, str):
        folder = resolve_image_path(image_folder, video)
        if not os.path.isdir(folder):
            if os.path.isfile(folder):
                raise BadSample("bad_video", f"{video!r} is a file; give a folder of frame images or a list of frames")
            raise BadSample("missing_image", f"video folder not found: {folder}")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES))
        # A frame file of the folder may itself be a link leading out.
        all_frames = [check_inside(image_folder, os.path.join(folder, n), f"{video}/{n}") for n in names]
    elif isinstance(video, (list, tuple)) and video:
        all_frames = [resolve_image_path(image_folder, f) for f in video]
    else:
        raise BadSample("bad_video", f"`video` must be a frame folder or a non-empty list of frames, got {video!r}")
    if not all_frames:
        raise BadSample("missing_image", f"video folder {video!r} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    picks = np.linspace(0, len(all_frames) - 1, frames, dtype=int)
    return [all_frames[int(i)] for i in picks]


# -- preprocessing -----------------------------------------------------------------------------


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

    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        valid = ", ".join(IMAGE_ASPECT_RATIOS)
        raise KeyError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; valid: {valid}")
    if image_aspect_ratio == "pad":
        background = mean_color(image_processor)
        images = [expand2square(img, background) for img in images]
    elif image_aspect_ratio == "resize":
        height, width = processor_output_size(image_processor)
        images = [img.resize((width, height), Image.Resampling.BICUBIC) for img in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.float()


def preprocess_anyres(images: list[Any], image_processor: Any, geometry: Any) -> tuple[Any, Any]:
    """RGB PIL images of one sample -> (pixel_values [sum of crops, 3, S, S], image_sizes LongTensor [n, 2]).

    The arch's own image processor (the one saved with the model) makes each image's base crop and
    grid crops; a OneVision sample with several images is passed as one nested list, as its processor
    expects, so each image is one padded-to-square crop. Every image keeps exactly
    `geometry.crops(h, w, n)` crops (the processor's zero padding to the batch's most crops is dropped),
    concatenated: transformers takes this 4-D form with `image_sizes`.
    """
    import torch

    n = len(images)
    nested = geometry.arch == "llava_onevision" and n > 1
    groups = [images] if nested else [[img] for img in images]
    crops, sizes = [], []
    for group in groups:
        out = image_processor(images=[group] if nested else group, return_tensors="pt")
        pixel_values = out["pixel_values"]  # [images, max crops, 3, S, S]
        for k, img in enumerate(group):
            count = geometry.crops(img.height, img.width, n)
            crops.append(pixel_values[k, :count])
            sizes.append([img.height, img.width])
    return torch.cat(crops, dim=0).float(), torch.tensor(sizes, dtype=torch.long)


def preprocess_video(frames: list[Any], image_processor: Any, crop: int) -> Any:
    """RGB PIL frames of one video -> FloatTensor [1, F, 3, S, S]: resized to S x S (bicubic), scaled to [0, 1]
    and normalised with the image processor's mean/std, as transformers' OneVision video processor does."""
    import numpy as np
    import torch
    from PIL import Image

    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    arrays = [
        (np.asarray(f.resize((crop, crop), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0 - mean) / std
        for f in frames
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().unsqueeze(0)  # [1, F, 3, S, S]
