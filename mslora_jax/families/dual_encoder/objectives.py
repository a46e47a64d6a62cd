"""The dual encoder's objectives: full backbone pretraining and one task's adapter.

Both are CLIP InfoNCE between images and the prompts of their classes (``class_tokens[label]``);
the adapter objective is ``train.adapter_loss.regularized_adapter_loss`` over the CLIP task loss
(paper: total = task + alpha_cr * CR + beta_ortho * ortho).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mslora_jax.losses.continual import lwf_loss, modx_loss
from mslora_jax.losses.contrastive import MAX_LOGIT_SCALE
from mslora_jax.models.clip import DualEncoder
from mslora_jax.models.pixels import model_images
from mslora_jax.train.adapter_loss import (
    AdapterContext,
    DistillFn,
    TaskLossFn,
    regularized_adapter_loss,
)
from mslora_jax.train.backbone import PretrainContext

# clip_loss_fn(image_emb, text_emb, prompt_ids, logit_scale) -> scalar; local or sharded.
ClipLossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def pretrain_loss(model: DualEncoder, clip_loss_fn: ClipLossFn):
    """Loss over the whole backbone (trainable = backbone params)."""

    def loss_fn(params, context: PretrainContext, batch, rng):
        del rng
        tokens = context.class_tokens[batch["label"]]
        image_emb, text_emb, logit_scale = model.apply(
            {"params": params}, model_images(model, batch["image"]), tokens
        )
        loss = clip_loss_fn(image_emb, text_emb, batch["label"], logit_scale)
        return loss, {"task_loss": loss}

    return loss_fn


def clip_task_loss(model: DualEncoder, clip_loss_fn: ClipLossFn) -> TaskLossFn:
    """InfoNCE between images and their class prompts, through backbone + summed adapters."""

    def task_loss(variables, trainable, context: AdapterContext, batch, rng):
        logit_scale = trainable.get("logit_scale", context.base_params["logit_scale"])
        images = model_images(model, batch["image"])
        # Each copy of a prompt draws its own dropout mask; and with more classes than
        # examples, encoding the batch's prompts is the smaller job.
        per_example = context.class_tokens.shape[0] >= batch["label"].shape[0]
        if model.lora_dropout > 0.0 or per_example:
            image_emb, text_emb, _ = model.apply(
                variables,
                images,
                context.class_tokens[batch["label"]],
                context.forward_weights,
                deterministic=False,
                rngs={"dropout": rng},
            )
        else:
            # Without dropout every prompt of a class is the same computation: encode each of the
            # C < B classes once ([C, L], not [B, L]) and gather by label. Same embeddings and
            # gradients (the gathered copies' gradients sum into the one encoding).
            weights = context.forward_weights
            image_emb = model.apply(variables, images, weights, method=DualEncoder.encode_image)
            class_emb = model.apply(
                variables, context.class_tokens, weights, method=DualEncoder.encode_text
            )
            text_emb = class_emb[batch["label"]]
        return clip_loss_fn(image_emb, text_emb, batch["label"], logit_scale)

    return task_loss


def clip_distillation(model: DualEncoder, term: str, temperature: float = 2.0) -> DistillFn:
    """The dual encoder's LwF or Mod-X term (``term``), both models run deterministic.

    ``lwf``: each image's logits over the current task's class prompts (``context.task_tokens``,
    padded columns masked by ``task_valid``), ``scale * cos``, the student at its own (possibly
    learned) temperature and the teacher at the backbone's; KL at ``temperature``.
    ``modx``: the in-batch image/prompt cosine similarities (``losses.continual.modx_loss``).
    The student's embeddings are recomputed here (the task loss does not return its own).
    """

    def embed(variables, context, batch, tokens):
        images = model_images(model, batch["image"])
        weights = context.forward_weights
        image_emb = model.apply(variables, images, weights, method=DualEncoder.encode_image)
        text_emb = model.apply(variables, tokens, weights, method=DualEncoder.encode_text)
        return image_emb, text_emb

    def distill(variables, teacher_vars, trainable, context, batch):
        if term == "modx":
            labels = batch["label"]
            if context.class_tokens.shape[0] >= labels.shape[0]:
                # A table larger than the batch (captions): encode the batch's rows only.
                tokens, pick = context.class_tokens[labels], jnp.arange(labels.shape[0])
            else:  # a few class prompts: encode each once and gather
                tokens, pick = context.class_tokens, labels
            s_img, s_txt = embed(variables, context, batch, tokens)
            t_img, t_txt = embed(teacher_vars, context, batch, tokens)
            return modx_loss(t_img, t_txt[pick], s_img, s_txt[pick], labels)
        s_img, s_cls = embed(variables, context, batch, context.task_tokens)
        t_img, t_cls = embed(teacher_vars, context, batch, context.task_tokens)
        scale = lambda x: jnp.exp(jnp.minimum(x, MAX_LOGIT_SCALE))
        student_scale = scale(trainable.get("logit_scale", context.base_params["logit_scale"]))
        teacher_scale = scale(context.base_params["logit_scale"])
        return lwf_loss(
            jax.lax.stop_gradient(teacher_scale * t_img @ t_cls.T),
            student_scale * s_img @ s_cls.T,
            temperature,
            context.task_valid,
        )

    return distill


def adapter_loss(
    model: DualEncoder,
    clip_loss_fn: ClipLossFn,
    folded: bool = False,
    cr_distance: str = "released",
    scaling: float = 1.0,
):
    """The dual encoder's adapter objective (CLIP task loss + MSLoRA-CR regularizers)."""
    task_loss = clip_task_loss(model, clip_loss_fn)
    return regularized_adapter_loss(task_loss, folded, cr_distance, scaling)
