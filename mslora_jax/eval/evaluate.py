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
from mslora_jax.models.pixels import model_images
from mslora_jax.parallel.mesh import process_rows, to_global_batch


def make_predict_fn(model: DualEncoder):
    """``predict(variables, weights, images, class_tokens, class_valid) -> class ids``.

    ``variables`` is ``{"params": base}`` plus, optionally, ``{"lora": stack}``; ``weights`` the
    ``[T]`` forward weights. Class tables are padded, so one compilation serves every task.
    """

    def predict(variables, weights, images, class_tokens, class_valid):
        text = model.apply(variables, class_tokens, weights, method=DualEncoder.encode_text)
        image = model.apply(
            variables, model_images(model, images), weights, method=DualEncoder.encode_image
        )
        logits = jnp.where(class_valid[None, :], image @ text.T, -jnp.inf)
        return jnp.argmax(logits, axis=-1)

    return jax.jit(predict)


def make_embed_fn(model: DualEncoder):
    """``embed(variables, weights, images) -> [N, D]`` unit image embeddings."""

    def embed(variables, weights, images):
        return model.apply(
            variables, model_images(model, images), weights, method=DualEncoder.encode_image
        )

    return jax.jit(embed)


def make_text_embed_fn(model: DualEncoder):
    """``embed(variables, weights, tokens) -> [N, D]`` unit text embeddings."""

    def embed(variables, weights, tokens):
        return model.apply(variables, tokens, weights, method=DualEncoder.encode_text)

    return jax.jit(embed)


def map_batches(mesh: Mesh, images: np.ndarray, batch_size: int, fn) -> np.ndarray:
    """``fn(global_images)`` over ``images`` in padded batches of ``batch_size``; the outputs'
    real rows, in order, gathered on every host."""
    outputs = []
    labels = np.zeros((len(images),), np.int32)
    for batch in eval_batches(images, labels, batch_size=batch_size):
        rows = to_global_batch(mesh, process_rows(mesh, {"image": batch["image"]}))["image"]
        # Gather the sharded outputs on every host (a no-op copy on a single process).
        out = np.asarray(multihost_utils.process_allgather(fn(rows), tiled=True))
        outputs.append(out[batch["mask"]])
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def _variables(base_params, lora_stack) -> dict:
    variables = {"params": base_params}
    if lora_stack is not None:
        variables[LORA_COLLECTION] = lora_stack
    return variables


def predict_classes(
    predict_fn,
    mesh: Mesh,
    base_params,
    lora_stack,
    weights,
    images: np.ndarray,
    class_tokens: np.ndarray,
    class_valid: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """The predicted class of each image (backbone + weighted adapters)."""
    variables = _variables(base_params, lora_stack)
    return map_batches(
        mesh,
        images,
        batch_size,
        lambda x: predict_fn(variables, weights, x, class_tokens, class_valid),
    )


def image_features(
    embed_fn, mesh: Mesh, base_params, weights, images: np.ndarray, batch_size: int
) -> np.ndarray:
    """Unit image embeddings ``[N, D]`` of the backbone ``base_params`` (no adapters)."""
    variables = _variables(base_params, None)
    return map_batches(mesh, images, batch_size, lambda x: embed_fn(variables, weights, x))


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
    preds = predict_classes(
        predict_fn,
        mesh,
        base_params,
        lora_stack,
        weights,
        images,
        class_tokens,
        class_valid,
        batch_size,
    )
    return accuracy(preds, labels)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """The share of ``preds`` equal to ``labels`` (0 for no examples)."""
    return float(np.mean(preds == np.asarray(labels))) if len(preds) else 0.0
