"""Zero-shot-style classification: the predicted class is the nearest class-prompt embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mslora_jax.data.pipeline import eval_batches
from mslora_jax.models.clip import DualEncoder
from mslora_jax.models.lora_dense import LORA_COLLECTION
from mslora_jax.parallel.mesh import process_rows, to_global_batch
from mslora_jax.train.objectives import normalize_images


def make_predict_fn(model: DualEncoder):
    """``predict(variables, weights, images, class_tokens, class_valid) -> class ids``.

    ``variables`` is ``{"params": base}`` plus, optionally, ``{"lora": stack}``; ``weights`` the
    ``[T]`` forward weights. Class tables are padded, so one compilation serves every task.
    """

    def predict(variables, weights, images, class_tokens, class_valid):
        text = model.apply(variables, class_tokens, weights, method=DualEncoder.encode_text)
        image = model.apply(
            variables, normalize_images(images), weights, method=DualEncoder.encode_image
        )
        logits = jnp.where(class_valid[None, :], image @ text.T, -jnp.inf)
        return jnp.argmax(logits, axis=-1)

    return jax.jit(predict)


def evaluate_accuracy(
    predict_fn,
    mesh: Mesh,
    base_params,
    lora_stack,
    weights,
    images: np.ndarray,
    labels: np.ndarray,
    class_tokens: np.ndarray,
    class_valid: np.ndarray,
    batch_size: int,
) -> float:
    """Accuracy of the model (backbone + weighted adapters) on one task's images."""
    variables = {"params": base_params}
    if lora_stack is not None:
        variables[LORA_COLLECTION] = lora_stack
    correct = total = 0
    for batch in eval_batches(images, labels, batch_size=batch_size):
        images = to_global_batch(mesh, process_rows(mesh, {"image": batch["image"]}))["image"]
        preds = predict_fn(variables, weights, images, class_tokens, class_valid)
        # Gather the sharded predictions on every host (a no-op copy on a single process).
        preds = np.asarray(multihost_utils.process_allgather(preds, tiled=True))
        mask = batch["mask"]
        correct += int(np.sum((preds == batch["label"]) & mask))
        total += int(mask.sum())
    return correct / max(total, 1)
