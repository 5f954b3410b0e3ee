"""Sample predictions on a few held-out rows, for the wandb prediction table at eval and at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llava_train.config import RunConfig
from llava_train.data.errors import BadSample
from llava_train.infer import GenerationOptions, make_predictor, read_records, record_request
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


def eval_predictions_fn(cfg: RunConfig, processor: Any) -> Callable[[Any], list[dict[str, Any]]] | None:
    """model -> rows {image, prompt, prediction, reference} for the first `wandb.log_predictions` rows of
    the first eval source; None without eval data or with wandb.log_predictions: 0.

    Runs on every rank: under ZeRO-3 transformers' generate syncs ranks itself (synced_gpus).
    Batch size 1, so the right-padding training tokenizer needs no left padding here.
    """
    n = cfg.wandb.log_predictions
    if n <= 0 or not cfg.data.eval:
        return None

    src = cfg.data.eval[0]
    requests = []
    for record in read_records(src.path)[:n]:
        try:
            requests.append(record_request(record, src.image_folder))
        except (BadSample, OSError, ValueError) as e:  # validated data should not get here; never crash a run
            log.warning("prediction table: skipping eval row %s: %s", record.get("id"), e)

    def predict(model: Any) -> list[dict[str, Any]]:
        was_training = model.training
        model.eval()
        generate = make_predictor(model, processor, GenerationOptions(max_new_tokens=32, batch_size=1))
        rows = []
        try:
            for request, reference in requests:
                rows.append(
                    {
                        "image": request.images[0] if request.images else None,
                        "prompt": processor.apply_chat_template(request.messages, add_generation_prompt=True),
                        "prediction": generate([request])[0],
                        "reference": reference,
                    }
                )
        finally:
            model.train(was_training)
        return rows

    return predict
