"""Pretrain the demo's tiny parts on the synthetic world, as real LLaVA starts from a pretrained CLIP and LM.

Stage 1 aligns a *pretrained* tower to a *pretrained* LM; with random parts it has nothing to align
(docs/demo.md). So before the two LLaVA stages the demo pretrains:

- the vision tower, supervised, on the training images (stage-1 and stage-2 splits, never the eval
  split): every patch token at the feature layer LLaVA reads (`vision_feature_layer`, CLS dropped)
  is trained to say what occupies the 3 x 3 grid cell under it (nothing, or a colour, shape, size and
  the cell), and the mean of an object's patch logits to name its colour, shape and size (no single
  patch sees a shape's outline: per-patch labels alone left shape at ~40%, docs/demo.md), as a
  detection-pretrained backbone's features say what is where. The linear heads are dropped afterwards:
  only the tower is saved.
- the language model, as a causal LM on the demo's text (captions, questions and answers of the
  training splits rendered as plain text, no image): it learns the words and the answer formats,
  not what any image shows.

Both are saved back into their HF folders (`save_pretrained`), so the LLaVA stages load them exactly
as they would load `openai/clip-vit-large-patch14-336` and `lmsys/vicuna-7b-v1.5`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from llava_train.data.images import preprocess_images
from llava_train.data.templates import TEMPLATES
from llava_train.llava_format import normalize_conversation
from llava_train.model.tiny import write_tiny_language_model, write_tiny_vision_tower
from llava_train.model.vision import select_best_resolution
from llava_train.tools.demo import shapes, splits
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

NONE = 0  # class 0 of every head: the cell is empty


def _schedule(optimizer: Any, steps: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)  # as the LLaVA stages


def _tokenizer_corpus(data: shapes.DemoData) -> list[str]:

    # The template's fixed strings must weigh as much as the data: with them seen 20 times, the
    # vicuna system prompt stayed 83 tokens (mostly characters); seen 1000 times, 37 tokens. Shorter
    # prompts are faster and leave the image a larger share of the attention.
    fixed = [TEMPLATES["vicuna_v1"].system, "USER: ASSISTANT:"]
    return fixed * 1000 + splits.corpus([data.pretrain, data.finetune])


def write_parts(workdir: Path, data: shapes.DemoData, size: Any, seed: int = 0) -> tuple[str, str]:
    """Write the tiny LM (tokenizer trained on the demo text) and the tiny CLIP tower, random-init, as HF
    folders under `workdir/models`; returns their folders. `size` is the demo's `DemoSize`."""
    import shutil

    lm, vision = workdir / "models" / "lm", workdir / "models" / "vision"
    for folder in (lm, vision):
        # Rewritten every run: the tokenizer depends on the generated text.
        shutil.rmtree(folder, ignore_errors=True)
    write_tiny_language_model(
        lm,
        corpus=_tokenizer_corpus(data),
        hidden_size=size.lm_hidden,
        layers=size.lm_layers,
        heads=size.lm_heads,
        seed=seed,
    )
    write_tiny_vision_tower(
        vision,
        kind="clip",
        image_size=size.image_size,
        patch_size=size.patch_size,
        hidden_size=size.vision_hidden,
        layers=size.vision_layers,
        seed=seed,
    )
    return str(lm), str(vision)


def _cell_targets(objects: list[dict[str, str]]) -> dict[int, tuple[int, int, int]]:
    """Cell index (row-major 0..8) -> (colour, shape, size) class ids (1-based; 0 = empty) of what is in it."""
    out = {}
    for o in objects:
        out[shapes.POSITIONS.index(o["position"])] = (
            list(shapes.COLORS).index(o["color"]) + 1,
            shapes.SHAPES.index(o["shape"]) + 1,
            shapes.SIZES.index(o["size"]) + 1,
        )
    return out


def patch_targets(
    objects: list[dict[str, str]], width: int, height: int, grid: int, to_image: Any = None, cell_head: bool = True
) -> torch.Tensor:
    """LongTensor [grid*grid, 5]: per patch of one tower input (a view of an image `width` x `height`), the
    (colour, shape, size, cell, object) of the object whose grid cell the patch centre lies in (cell 1..9; 0 for
    empty cells and padding; object = the cell, the id the per-object pooling groups by).

    `to_image(x, y)` maps a point of the view (in units of the view's side, 0..1) to image pixels; None: the
    LLaVA-1.5 `pad` view (the image centred in a square). `cell_head=False` (an anyres grid crop, which shows
    part of the image and cannot know which part) marks the cell target -100 (ignored)."""
    if to_image is None:
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2  # expand2square centres the image

        def to_image(x: float, y: float) -> tuple[float, float]:
            return x * side - left, y * side - top

    cells = _cell_targets(objects)
    out = torch.zeros(grid * grid, 5, dtype=torch.long)
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        x, y = to_image((c + 0.5) / grid, (r + 0.5) / grid)
        if not (0 <= x < width and 0 <= y < height):
            continue
        cell = int(y // (height / 3)) * 3 + int(x // (width / 3))
        if cell in cells:
            out[p] = torch.tensor([*cells[cell], cell + 1, cell + 1])
    if not cell_head:
        out[:, 3] = -100
    return out


def anyres_view_maps(width: int, height: int, crop: int, pinpoints: Any) -> list[tuple[Any, bool]]:
    """The views an anyres processor (LLaVA-NeXT / OneVision, single image) makes of a `width` x `height` image,
    in its order: the base view (the whole image squashed to crop x crop) then the grid crops of the best
    pinpoint, row-major (the image resized keeping its aspect ratio, centred on a zero canvas, cut into
    crop-sized tiles). Per view: (map from view coordinates 0..1 to image pixels, whether the view shows
    the whole image)."""
    import math

    best_h, best_w = select_best_resolution(height, width, pinpoints)
    # transformers' get_patch_output_size: fit inside the pinpoint, keep the aspect ratio.
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    maps: list[tuple[Any, bool]] = [(lambda x, y: (x * width, y * height), True)]
    for i in range(best_h // crop):
        for j in range(best_w // crop):

            def tile(x: float, y: float, i: int = i, j: int = j) -> tuple[float, float]:
                return ((j + x) * crop - pad_x) * width / new_w, ((i + y) * crop - pad_y) * height / new_h

            maps.append((tile, False))
    return maps


def _vision_batches(
    rows: list[dict[str, Any]], image_folder: Path, processor: Any, grid: int, anyres: Any = None
) -> tuple:
    """(pixel_values [N, V, 3, S, S], targets [N, V * P, 5]) of every image row's tower inputs: V = 1 view per
    image preprocessed as LLaVA's `pad` (anyres None), or with `anyres` = (the arch's image processor,
    pinpoints) every view the anyres model encodes (base view + grid crops, `anyres_view_maps`), padded to the
    most views of any image with blank views (targets: empty). An image's views share one row of targets, so
    the per-object loss pools an object over every view that shows it, as the LM reads them together."""
    from PIL import Image

    pixels, targets = [], []
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        images = [Image.open(image_folder / r["image"]).convert("RGB") for r in chunk]
        if anyres is None:
            pixels.extend(preprocess_images(images, processor, "pad")[:, None])
            for r, img in zip(chunk, images):
                targets.append(patch_targets(r["objects"], *img.size, grid))
            continue
        image_processor, pinpoints = anyres
        crop = processor_crop(image_processor)
        for r, img in zip(chunk, images):
            maps = anyres_view_maps(*img.size, crop, pinpoints)
            values = image_processor(images=[img], return_tensors="pt")["pixel_values"][0, : len(maps)]
            pixels.append(values.float())
            views = [patch_targets(r["objects"], *img.size, grid, to_image, whole) for to_image, whole in maps]
            targets.append(torch.cat(views))
    most = max(len(p) for p in pixels)
    pixels = [torch.cat([p, p.new_zeros(most - len(p), *p.shape[1:])]) for p in pixels]
    targets = [torch.cat([t, t.new_zeros(most * grid * grid - len(t), t.shape[1])]) for t in targets]
    return torch.stack(pixels), torch.stack(targets)


def processor_crop(image_processor: Any) -> int:
    """The side of the square crops an anyres image processor gives the tower."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    crop = crop if isinstance(crop, dict) else crop.__dict__
    return int(crop.get("height") or crop.get("shortest_edge"))


def pretrain_vision_tower(
    folder: str | Path,
    data: shapes.DemoData,
    steps: int,
    feature_layer: int = -2,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    probe: str | Path | None = None,
    anyres: Any = None,
) -> dict[str, Any]:
    """Train the tower in `folder` in place (see the module docstring); returns {"loss": per step, "accuracy":
    per head on the last batch's patches of occupied cells}, and with `probe` (a LLaVA JSON of images with
    `objects`, e.g. the held-out eval split, only measured) "probe": per head, the share of its objects
    whose cell's patches vote (majority of argmax) the right class. `anyres` = (the arch's image processor,
    pinpoints): train and probe on the views an anyres model encodes (base view + grid crops) instead of
    padded squares (docs/demo.md: a tower trained on padded squares of wide images saw its shapes at half
    size and never saw a crop)."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel.from_pretrained(str(folder))
    processor = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)
    config = model.config
    grid = config.image_size // config.patch_size
    rows = [
        r
        for p in (data.pretrain, data.finetune)
        for r in json.loads(Path(p).read_text())
        if isinstance(r.get("image"), str)
    ]
    pixels, targets = _vision_batches(rows, data.image_folder, processor, grid, anyres)
    classes = (len(shapes.COLORS) + 1, len(shapes.SHAPES) + 1, len(shapes.SIZES) + 1, len(shapes.POSITIONS) + 1)
    heads = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, n) for n in classes)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = _schedule(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    acc: dict[str, float] = {}
    losses: list[float] = []
    views = pixels.shape[1]
    images_per_step = max(1, batch_size // views)  # about batch_size tower inputs per step
    for step in range(steps):
        idx = torch.randint(0, len(pixels), (images_per_step,), generator=g)
        tokens = _features(model, pixels[idx], feature_layer)  # [B, V * P, D]: what LLaVA's projector reads
        y = targets[idx]  # [B, V * P, 5]
        logits = [head(tokens) for head in heads]
        ce = torch.nn.functional.cross_entropy
        # Per patch: what is in its cell. Per object: colour, shape and size from the mean of its cell's
        # patches' logits (shape and size are facts of several patches together, none sees them alone).
        loss = sum(ce(lg.flatten(0, 1), y[..., k].flatten(), ignore_index=-100) for k, lg in enumerate(logits))
        pooled, labels = _per_object(logits[:3], y)
        loss = loss + sum(ce(pl, labels[:, k]) for k, pl in enumerate(pooled))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step == steps - 1 or step % 100 == 0:
            acc = {
                name: round(float((pl.argmax(-1) == labels[:, k]).float().mean()), 3)
                for k, (name, pl) in enumerate(zip(("colour", "shape", "size"), pooled))
            }
            occupied = (y[..., 0] != NONE) & (y[..., 3] >= 0)
            acc["cell"] = round(float((logits[3].argmax(-1) == y[..., 3])[occupied].float().mean()), 3)
            log.info("demo: vision pretrain step %d loss %.3f occupied-patch accuracy %s", step, loss.item(), acc)
    model.save_pretrained(str(folder))
    out: dict[str, Any] = {"loss": losses, "accuracy": acc}
    if probe is not None:
        rows = [r for r in json.loads(Path(probe).read_text()) if isinstance(r.get("image"), str)]
        out["probe"] = _probe(
            model, heads, feature_layer, *_vision_batches(rows, data.image_folder, processor, grid, anyres)
        )
    return out


def _per_object(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mean over each object's patches of each head's logits ([objects, classes] each) and the objects'
    (colour, shape, size) labels [objects, 3]; objects = occupied cells of the batch's images."""
    cells = y[..., 4]  # [B, P]: the object (its cell) each patch belongs to
    onehot = torch.nn.functional.one_hot(cells, len(shapes.POSITIONS) + 1).to(logits[0].dtype)  # [B, P, 10]
    count = onehot.sum(1)  # [B, 10]
    present = count > 0
    present[:, NONE] = False
    labels = torch.zeros(*count.shape, 3, dtype=torch.long).scatter_(1, cells[..., None].expand(-1, -1, 3), y[..., :3])
    means = [(torch.einsum("bpc,bpk->bck", onehot, lg) / count.clamp(min=1)[..., None])[present] for lg in logits]
    return means, labels[present]


def _features(model: Any, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """[B, V, 3, S, S] views -> [B, V * P, D]: each image's views' patch features at the layer LLaVA reads
    (CLS dropped), the views' patches one after the other."""
    out = model(pixel_values=pixels.flatten(0, 1), output_hidden_states=True)
    tokens = out.hidden_states[feature_layer][:, 1:]  # [B * V, P, D]
    return tokens.reshape(len(pixels), -1, tokens.shape[-1])


@torch.no_grad()
def _probe(model: Any, heads: Any, feature_layer: int, pixels: torch.Tensor, targets: torch.Tensor) -> dict:
    model.eval()
    names = ("colour", "shape", "size")
    right, total = dict.fromkeys(names, 0), 0
    for start in range(0, len(pixels), 64):
        tokens = _features(model, pixels[start : start + 64], feature_layer)
        means, labels = _per_object([head(tokens) for head in heads[:3]], targets[start : start + 64])
        total += len(labels)
        for k, name in enumerate(names):
            right[name] += int((means[k].argmax(-1) == labels[:, k]).sum())
    return {name: round(right[name] / max(total, 1), 3) for name in names}


def lm_corpus(sources: list[tuple[Path, Any]], tokenizer: Any, seed: int = 0) -> list[str]:
    """The LM's pretraining documents: every row of each (LLaVA JSON file, template) rendered by that template
    (the demo's stage-1 plain captions, stage-2 vicuna_v1 dialogues) with the image placeholders dropped."""

    docs = []
    for path, template in sources:
        for row in json.loads(Path(path).read_text()):
            text = template.prompt(normalize_conversation(row["conversations"]), tokenizer)
            for tag in ("<image>\n", "<image>", "<video>\n", "<video>"):
                text = text.replace(tag, "")
            docs.append(text)
    random.Random(seed).shuffle(docs)
    return docs


def pretrain_language_model(
    folder: str | Path,
    sources: list[tuple[Path, Any]],
    steps: int,
    seq_len: int = 128,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the causal LM in `folder` in place on `lm_corpus(sources)` (packed into rows of `seq_len`, BOS
    between documents); returns {"loss": per step}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    ids: list[int] = []
    for doc in lm_corpus(sources, tokenizer, seed):
        ids.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
    stream = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = _schedule(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        batch = stream[torch.randint(0, len(stream), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("demo: LM pretrain step %d loss %.3f", step, losses[-1])
    model.save_pretrained(str(folder))
    return {"loss": losses}
