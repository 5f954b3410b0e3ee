"""What `model.init_from` points at, detected from its files: HF-native LLaVA, our stage 1, or the original format.

A hub id is resolved to its snapshot in the local Hugging Face cache (`weights.resolve_folder`); a
local folder is used as it is; a `.bin` / `.safetensors` file is a projector. No tensor is read to
decide: config.json, the weight index or safetensors headers, and the file names are enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_train.errors import InitFromError
from llava_train.model.original import MM_PROJECTOR_FILE, OriginalConfig, is_original_config, raw_config, read_config
from llava_train.model.weights import checkpoint_names, resolve_folder, weight_files
from llava_train.run_files import PROJECTOR_FILE

# The kinds, in the order they are tried on a folder.
KINDS = {
    "full": "HF-native LLaVA model (ours or llava-hf)",
    "projector": f"llava-train stage-1 {PROJECTOR_FILE}",
    "original": "original-format LLaVA checkpoint (LlavaLlamaForCausalLM & co.)",
    "original_projector": f"original-format stage-1 {MM_PROJECTOR_FILE}",
}


@dataclass(frozen=True)
class InitSource:
    """A resolved `model.init_from`.

    kind: one of KINDS.
    folder: the local folder (a hub id's cached snapshot; a projector file's folder).
    projector_file: the projector file of the projector kinds, else None.
    original: the original config's fields (original kinds with a config.json), else None.
    """

    kind: str
    folder: Path
    projector_file: Path | None = None
    original: OriginalConfig | None = None

    def describe(self) -> str:
        """One line for the log: the kind and what it was read from."""
        where = self.projector_file or self.folder
        return f"{KINDS[self.kind]} ({where})"


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _has_lm_weights(folder: Path) -> bool:
    try:
        names = checkpoint_names(folder)
    except FileNotFoundError:
        return False
    return any(".language_model." in n or n.startswith("language_model.") for n in names)


def _has_weights(folder: Path) -> bool:
    try:
        weight_files(folder)
    except FileNotFoundError:
        return False
    return True


def init_source(init_from: str | None, weights: bool = False) -> InitSource | None:
    """Detect what `init_from` is; `weights=True` makes a hub id's snapshot hold its weights too.

    Tried in order: a HF-native LLaVA config.json (with text_config) whose weights include the
    language model -> `full`; `projector.safetensors` -> `projector`; an original-format config.json
    with model weights -> `original`; `mm_projector.bin` (or the file itself) -> `original_projector`.
    Anything else is an error saying what was expected.
    """
    if init_from is None:
        return None
    name = str(init_from)
    path = Path(name).expanduser()
    if path.is_file():
        return _from_file(path)
    if not path.is_dir():
        if not _is_hub_id(name):
            raise InitFromError(f"model.init_from={name}: no such file or folder (and not a hub id like org/name)")
        path = resolve_folder(name, weights=weights, also=(MM_PROJECTOR_FILE,))
    raw = raw_config(path)
    if raw is not None and "text_config" in raw and "vision_config" in raw and _has_lm_weights(path):
        return InitSource("full", path)
    if (path / PROJECTOR_FILE).is_file():
        return InitSource("projector", path, path / PROJECTOR_FILE)
    original = read_config(raw) if raw is not None and is_original_config(raw) else None
    if original is not None and _has_weights(path):
        return InitSource("original", path, original=original)
    if (path / MM_PROJECTOR_FILE).is_file():
        return InitSource("original_projector", path, path / MM_PROJECTOR_FILE, original)
    raise InitFromError(
        f"model.init_from={name}: expected a HF-native LLaVA folder (config.json with text_config and its weights), "
        f"a stage-1 folder holding {PROJECTOR_FILE}, an original-format LLaVA checkpoint (config.json with mm_* "
        f"fields and its weights) or an original {MM_PROJECTOR_FILE}"
    )


def _from_file(path: Path) -> InitSource:
    if path.suffix == ".safetensors":
        return InitSource("projector", path.parent, path)
    if path.suffix == ".bin":
        raw = raw_config(path.parent)
        original = read_config(raw) if raw is not None and is_original_config(raw) else None
        return InitSource("original_projector", path.parent, path, original)
    raise InitFromError(
        f"model.init_from={path}: a file must be a projector ({PROJECTOR_FILE} or {MM_PROJECTOR_FILE})"
    )


def tokenizer_folder(source: InitSource | None) -> Path | None:
    """The init_from folder when its model was trained with the tokenizer it holds (full and original kinds)."""
    if source is None or source.kind not in ("full", "original"):
        return None
    if source.kind == "full" or (source.folder / "tokenizer_config.json").is_file():
        return source.folder
    return None
