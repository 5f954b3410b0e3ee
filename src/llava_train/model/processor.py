"""The processor saved with every model: image processor + tokenizer + chat template, per `model.arch`.

It must expand each image exactly as training did (`model.vision.ImageGeometry`), so the image
processor of the anyres archs is built from the tower's own (mean, std) with the run's crop size
and pinpoints, and training preprocesses images with this very object. transformers cannot build a
`LlavaOnevisionProcessor` without torchvision (its video processor is torchvision-only and the
class check fails even for `video_processor=None`); on such machines we save the same files with
`video_processor=None` through a subclass that only skips that check, so the folder still says
`LlavaOnevisionProcessor` and loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.model.builder import ARCH_CLASSES
from llava_train.model.sources import ModelSources
from llava_train.model.vision import ImageGeometry, feature_select_strategy, num_additional_image_tokens, tower_tokens
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def build_image_processor(cfg: RunConfig, source: Path, geometry: ImageGeometry) -> Any:
    """The tower's image processor (llava), or the arch's anyres image processor with the tower's mean/std."""
    import transformers
    from transformers import AutoImageProcessor

    base = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=False)
    if cfg.model.arch == "llava":
        return base
    crop = geometry.crop
    common = {
        "image_mean": list(base.image_mean),
        "image_std": list(base.image_std),
        "image_grid_pinpoints": [list(p) for p in geometry.pinpoints],
        "do_pad": True,
    }
    cls = getattr(transformers, ARCH_CLASSES[cfg.model.arch][3])
    if cfg.model.arch == "llava_next":
        return cls(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, **common)
    return cls(size={"height": crop, "width": crop}, **common)


def _video_settings(image_processor: Any) -> dict[str, Any]:
    """The OneVision video processor's settings: S x S bicubic resize, 1/255, the tower's mean/std (as
    `data.images.preprocess_video` does in training)."""
    size = image_processor.size
    return {
        "size": {"height": size["height"], "width": size["width"]},
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "resample": 3,  # bicubic
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_center_crop": None,
        "do_sample_frames": False,
    }


def _onevision_video_processor(image_processor: Any) -> Any:
    """transformers' OneVision video processor when torchvision is installed, else None."""
    try:
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionVideoProcessor(**_video_settings(image_processor))
    except ImportError:
        return None


def _video_processor_record(image_processor: Any) -> Any:
    """Without torchvision: an object that serialises as the video processor would (its settings in
    processor_config.json), so the saved folder loads with AutoProcessor where torchvision exists.
    It cannot process videos itself (training preprocesses them in `data.images.preprocess_video`)."""
    from transformers.utils import PushToHubMixin

    settings = {**_video_settings(image_processor), "video_processor_type": "LlavaOnevisionVideoProcessor"}

    class VideoProcessorSettings(PushToHubMixin):
        _auto_class = None

        def to_dict(self) -> dict[str, Any]:
            return dict(settings)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise ImportError("processing videos with the saved processor needs torchvision (transformers' rule)")

    return VideoProcessorSettings()


def _onevision_processor_class() -> Any:
    from transformers import LlavaOnevisionProcessor as HFOnevisionProcessor

    class LlavaOnevisionProcessor(HFOnevisionProcessor):
        """transformers' class, buildable without torchvision (no video processor); saves as the original."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return LlavaOnevisionProcessor


def build_processor(
    cfg: RunConfig, tokenizer: Any, template: Any, sources: ModelSources, geometry: ImageGeometry
) -> Any:
    """The arch's processor: the image processor, the tokenizer and the template as chat_template.

    llava: `<image>` expands to exactly the geometry's base tokens (CLIP counts its CLS token,
    num_additional_image_tokens=1, which `default` then drops; SigLIP has none). llava_next /
    llava_onevision: the processor's own anyres count from each image's size, which equals
    `ImageGeometry.image_tokens` (tests/model/test_geometry.py checks 300 sizes per arch).
    """
    import transformers

    vision = sources.vision_config
    image_processor = build_image_processor(cfg, sources.vision_folder, geometry)
    strategy = feature_select_strategy(vision, cfg.model.vision_feature_select)
    chat_template = template.chat_template(tokenizer)
    arch = cfg.model.arch
    if arch == "llava_onevision":
        video_processor = _onevision_video_processor(image_processor)
        cls = _onevision_processor_class() if video_processor is None else transformers.LlavaOnevisionProcessor
        processor = cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=tower_tokens(vision),
            vision_feature_select_strategy=strategy,
            vision_aspect_ratio=geometry.aspect_ratio,
            image_token=cfg.model.image_token,
            video_token=cfg.model.video_token,
            chat_template=chat_template,
        )
        if video_processor is None:
            processor.video_processor = _video_processor_record(image_processor)
        return processor
    cls = getattr(transformers, ARCH_CLASSES[arch][2])
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision.patch_size),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_additional_image_tokens(vision),
        image_token=cfg.model.image_token,
        chat_template=chat_template,
    )


def load_saved_processor(folder: str | Path, model_type: str) -> Any:
    """`AutoProcessor.from_pretrained(folder)`; for OneVision without torchvision (transformers insists on its
    torchvision-only video processor) the same processor without video support, with a warning."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder), trust_remote_code=False)
    except ImportError:
        if model_type != "llava_onevision":
            raise
        log.warning("torchvision is not installed: OneVision processor loaded without video support")
        return load_onevision_processor(folder)


def load_onevision_processor(folder: str | Path) -> Any:
    """A saved OneVision processor without torchvision (where `AutoProcessor` raises ImportError for its video
    processor): the image processor, tokenizer, chat template and processor settings read from `folder`.
    Images and text work exactly as with AutoProcessor; videos need torchvision."""
    import json

    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    folder = Path(folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    image_settings = {k: v for k, v in settings.get("image_processor", {}).items() if k != "image_processor_type"}
    image_processor = LlavaOnevisionImageProcessorPil(**image_settings)
    template = folder / "chat_template.jinja"
    processor = _onevision_processor_class()(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False),
        video_processor=None,
        chat_template=template.read_text() if template.is_file() else None,
        **{k: settings[k] for k in ONEVISION_SETTINGS if k in settings},
    )
    processor.video_processor = _video_processor_record(image_processor)
    return processor


# LlavaOnevisionProcessor's own settings as saved in processor_config.json.
ONEVISION_SETTINGS = (
    "num_image_tokens",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "image_token",
    "video_token",
)
