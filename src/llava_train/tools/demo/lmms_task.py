"""The demo's held-out split as an lmms-eval task, `llava_train_demo` (exact match), so lmms-eval's number can be
reported beside the demo's own table: `eval.lmms_include_path: <workdir>/lmms_tasks` during training, or
`llava-train lmms-eval RUN --tasks llava_train_demo --include-path <workdir>/lmms_tasks`.

lmms-eval reads the task in its own environment, without llava-train: the folder holds the YAML, the documents
(JSONL, absolute image paths) and a `utils.py` whose answer normalisation is `infer.normalize`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_train.infer import record_request

TASK_NAME = "llava_train_demo"
TASKS_DIR = "lmms_tasks"

# `infer.normalize` (lowercase, punctuation to spaces, whitespace collapsed): the demo table's exact match.
UTILS_PY = '''"""llava_train_demo: documents, prompts and exact match (written by `llava-train demo`)."""

import re
import string

from PIL import Image

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text):
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # The question without the image tag: llava_hf puts the image first, as the training prompt has it.
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
'''

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def task_documents(eval_json: str | Path, image_folder: str | Path) -> list[dict[str, Any]]:
    """One document per held-out one-image row: id, type, absolute image path, question (no image tag), answer
    (the task reads one image per document: the OneVision demo's two-image rows are left out)."""
    docs = []
    for record in json.loads(Path(eval_json).read_text()):
        if not isinstance(record.get("image"), str):
            continue
        request, answer = record_request(record, image_folder)
        [message] = request.messages  # the demo's eval rows are single-question
        question = next(item["text"] for item in message["content"] if item["type"] == "text")
        image = str((Path(image_folder) / record["image"]).resolve())
        row = {"id": record["id"], "type": record.get("type", ""), "image": image, "question": question}
        docs.append({**row, "answer": answer})
    return docs


def write_lmms_task(
    eval_json: str | Path, image_folder: str | Path, out_dir: str | Path, max_new_tokens: int = 8
) -> Path:
    """Write `<out_dir>/llava_train_demo/` (YAML, documents, utils.py); returns `out_dir`, the include path."""
    folder = Path(out_dir) / TASK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in task_documents(eval_json, image_folder)))
    (folder / "utils.py").write_text(UTILS_PY)
    yaml_text = YAML.format(task=TASK_NAME, data=json.dumps(str(data.resolve())), max_new_tokens=max_new_tokens)
    (folder / f"{TASK_NAME}.yaml").write_text(yaml_text)
    return Path(out_dir)
