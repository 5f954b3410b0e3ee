"""Model build start-up: `load_components` (our builder) vs plain `from_pretrained` of the same two parts.

    python scripts/measure_build.py [--workdir /tmp/build_parts] [--lm-layers 22]

Writes (once) a random-init 1.1B Llama (TinyLlama-1.1B's shape: d 2048, 22 layers, ff 5632, 32 heads,
4 KV heads, vocab 32000) and CLIP-L/14-336 as bf16 safetensors folders with a Llama tokenizer from the
`mistral-common` wheel, then runs each measurement in a fresh process (peak RSS is per process):
`from_pretrained` of the LM + `from_pretrained` of the tower, and `components.load_components` of a
finetune config on those folders. Prints one JSON line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_parts(root: Path, lm_layers: int) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    lm, vt = root / "lm", root / "vision"
    if not (lm / "tokenizer_config.json").is_file() and (lm / "config.json").is_file():
        _write_tokenizer(lm)
    if (lm / "config.json").is_file() and (vt / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=lm_layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(lm)
    del model
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        projection_dim=768,
    )
    CLIPVisionModel(vision).to(torch.bfloat16).save_pretrained(vt)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vt)
    _write_tokenizer(lm)


def _write_tokenizer(folder: Path) -> None:
    """Mistral-7B v1's 32000-piece SentencePiece model (Llama-family, like Vicuna's) from the mistral-common
    wheel (`pip install mistral-common`; offline)."""
    import mistral_common
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    tok.save_pretrained(folder)


def measure(kind: str, root: Path) -> dict:
    start = time.perf_counter()
    if kind == "from_pretrained":
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(root / "lm", dtype=torch.bfloat16)
        AutoModel.from_pretrained(root / "vision", dtype=torch.bfloat16)
    else:
        from llava_train.components import load_components
        from llava_train.config import from_dict

        cfg = from_dict(
            {
                "stage": "finetune",
                "model": {
                    "language_model": str(root / "lm"),
                    "vision_tower": str(root / "vision"),
                    "dtype": "bfloat16",
                },
                "data": {"template": "vicuna_v1"},
                "train": {"output_dir": str(root / "run")},
            }
        )
        load_components(cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"kind": kind, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/build_parts")
    ap.add_argument("--lm-layers", type=int, default=22)
    ap.add_argument("--measure", choices=["from_pretrained", "load_components"])
    args = ap.parse_args()
    root = Path(args.workdir)
    if args.measure:
        print(json.dumps(measure(args.measure, root)))
        return 0
    write_parts(root, args.lm_layers)
    bf16_gib = sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**30
    rows = []
    for kind in ("from_pretrained", "load_components"):
        out = subprocess.run(
            [sys.executable, __file__, "--workdir", str(root), "--measure", kind],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    base, ours = rows
    print(
        json.dumps(
            {
                "bf16_weights_gib": round(bf16_gib, 2),
                "time_ratio": round(ours["seconds"] / base["seconds"], 2),
                "rss_over_bf16_bytes": round(ours["peak_rss_gib"] / bf16_gib, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
