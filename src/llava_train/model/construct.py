"""Making the model object fast: construction without the random init the checkpoints overwrite, transformers'
own init of only what no checkpoint holds, and the embedding resize for added tokens.

Measured (scripts/measure_build.py, 1.1B Llama + CLIP-L/336 bf16 on local disk, 2 shared CPU cores):
`load_components` 1.45x the time of `from_pretrained` of the two parts, peak RSS 1.15x their bf16 bytes
(before: ~7x and 1.9x; ~75% of the time was random init of weights that were then replaced).
"""

from __future__ import annotations

from typing import Any

from llava_train.utils.distributed import gathered
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def resize_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings (and an untied lm_head) to the tokenizer; the new rows are the old rows' mean.

    That is LLaVA's own rule (`smart_tokenizer_and_embedding_resize`): deterministic, so a rebuilt base
    model is identical (LoRA merging relies on it: the new rows are not in the adapter), and cheap,
    where transformers' default samples from the old rows' covariance (seconds for a 7B vocabulary).
    """
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) <= vocab:
        return
    import torch

    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with gathered(tables, modifier_rank=0), torch.no_grad():
        for weight in tables:
            if weight.numel():  # ZeRO-3: only the modifier rank holds the gathered table
                weight[vocab:] = weight[:vocab].mean(dim=0, dtype=torch.float32).to(weight.dtype)
    log.info("token embeddings resized %d -> %d (new rows: the mean of the old ones)", vocab, len(tokenizer))


def construct(cls: Any, config: Any, dtype: Any, attn: str) -> Any:
    """The arch's model with random init skipped for every part the pretrained files overwrite.

    Outside ZeRO-3 the modules are built without running their initialisers (transformers'
    `no_init_weights`: the LM's and tower's random init was ~75% of the build time for 1.1B), and only
    what no checkpoint provides (the projector, NeXT / OneVision's image newline) is initialised
    afterwards by `init_new_parts`. Under ZeRO-3, `zero.Init` partitions at construction and transformers
    initialises module by module, gathered, as before.
    """
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return cls._from_config(config, dtype=dtype, attn_implementation=attn)
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    model._llava_train_uninitialised = True
    return model


def init_new_parts(model: Any) -> None:
    """Initialise (transformers' own `_init_weights`) the parts no pretrained file holds: the projector and the
    image newline. A no-op for models built by `_from_config` with init (ZeRO-3)."""
    import torch

    if not getattr(model, "_llava_train_uninitialised", False):
        return
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            model._init_weights(module)
        if hasattr(model.model, "image_newline"):
            model._init_weights(model.model)  # NeXT / OneVision: normal(0, 1 / sqrt(hidden))
    del model._llava_train_uninitialised
