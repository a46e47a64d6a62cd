"""The dual-encoder experiment: image classification tasks, predicted as the nearest class prompt,
with a prototype router for task-agnostic inference.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mslora_jax.config import ExperimentConfig
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.prompt_tokenizer import prompt_encoder
from mslora_jax.data.registry import ClassTable, class_table, union_train_split
from mslora_jax.data.task import TaskData
from mslora_jax.eval.evaluate import (
    accuracy,
    image_features,
    make_embed_fn,
    make_predict_fn,
    make_text_embed_fn,
    predict_classes,
)
from mslora_jax.eval.router import PrototypeRouter, fit_router, router_accuracy
from mslora_jax.families.dual_encoder.objectives import clip_distillation, clip_task_loss
from mslora_jax.lora.targets import select_targets
from mslora_jax.losses.contrastive import sharded_clip_loss
from mslora_jax.models.clip import DualEncoder
from mslora_jax.parallel.mesh import process_row_range
from mslora_jax.train.methods import Method
from mslora_jax.train.stream_experiment import StreamExperiment, TaskMetrics


class Experiment(StreamExperiment):
    """The dual encoder on image classification tasks (prediction = nearest class prompt)."""

    model_family = "dual_encoder"

    def __init__(
        self, config, tasks: list[TaskData], table: ClassTable, mesh, base_params, targets
    ):
        self.table = table
        self.model = DualEncoder(config.model, lora_dropout=config.lora.dropout)
        self.predict_fn = make_predict_fn(self.model)
        self.embed_fn = make_embed_fn(self.model)
        self.text_embed_fn = make_text_embed_fn(self.model)
        self.max_classes = max(table.sizes)
        super().__init__(config, tasks, mesh, base_params, targets)

    def task_loss(self):
        return clip_task_loss(self.model, sharded_clip_loss(self.mesh))

    def extra_trainables(self) -> dict:
        if self.config.train.learn_temperature:
            return {"logit_scale": self.base_params["logit_scale"]}
        return {}

    def context_inputs(self) -> dict:
        return {"class_tokens": jnp.asarray(self.table.tokens)}

    def distillation(self, term: str):
        return clip_distillation(self.model, term, self.config.regularizer.lwf_temperature)

    def distill_inputs(self, task: int) -> dict:
        tokens, valid = self.table.task_tokens(task, self.max_classes)
        return {"task_tokens": jnp.asarray(tokens), "task_valid": jnp.asarray(valid)}

    def train_batches(
        self, task_indices: list[int], num_steps: int, seed: int, start_step: int = 0
    ):
        images, labels = union_train_split(self.tasks, self.table, task_indices)
        batch_size = self.config.stage_batch_size(task_indices)
        return train_batches(
            images,
            labels,
            batch_size=batch_size,
            num_steps=num_steps,
            seed=seed,
            rows=process_row_range(self.mesh, batch_size),
            start_step=start_step,
            **self.stage_mixture(task_indices),
            **self.config.train.input_options(),
        )

    @functools.cached_property
    def routes(self) -> list[np.ndarray]:
        """The router's task for each test image of each task (see ``eval.router``)."""
        embed, weights = self.embed_fn, self.weights([])
        params = self.inference_params({}, [])

        def features(images):
            return image_features(embed, self.mesh, params, weights, images, self.eval_batch_size)

        router: PrototypeRouter = fit_router(
            [features(t.train_images) for t in self.tasks], [t.train_labels for t in self.tasks]
        )
        return [router.route(features(t.test_images)) for t in self.tasks]

    def router_accuracy(self) -> list[float]:
        return [router_accuracy(routes, task) for task, routes in enumerate(self.routes)]

    def routed_accuracy(self, slots: dict[int, dict], method: Method) -> list[float]:
        accuracies = []
        for task, routes in enumerate(self.routes):
            data, kept = self.tasks[task], routes == task
            if not kept.any():
                accuracies.append(0.0)
                continue
            preds = self._predictions(slots, method.eval_slots(task), task, data.test_images[kept])
            accuracies.append(float(np.sum(preds == data.test_labels[kept]) / len(routes)))
        return accuracies

    def embed_images(self, slots: dict[int, dict], active: list[int], images) -> np.ndarray:
        params = self.inference_params(slots, active)
        weights = self.weights(active)
        return image_features(
            self.embed_fn, self.mesh, params, weights, images, self.eval_batch_size
        )

    def embed_class_prompts(
        self, slots: dict[int, dict], active: list[int], task: int
    ) -> np.ndarray:
        # Padded to the largest task's class count: one compilation serves every task.
        tokens, valid = self.table.task_tokens(task, self.max_classes)
        params = self.inference_params(slots, active)
        embeddings = self.text_embed_fn({"params": params}, self.weights(active), tokens)
        return np.asarray(embeddings)[valid]

    @functools.cached_property
    def _tokenize(self):
        return prompt_encoder(self.config)

    def embed_texts(self, slots: dict[int, dict], active: list[int], texts) -> np.ndarray:
        tokens = self._tokenize(list(texts))
        params, weights = self.inference_params(slots, active), self.weights(active)
        size = self.eval_batch_size  # fixed-size chunks: one compilation for any count
        out = []
        for start in range(0, len(tokens), size):
            chunk = np.zeros((size, tokens.shape[1]), np.int32)
            part = tokens[start : start + size]
            chunk[: len(part)] = part
            embedded = self.text_embed_fn({"params": params}, weights, chunk)
            out.append(np.asarray(embedded)[: len(part)])
        if not out:
            return np.zeros((0, self.config.model.embed_dim), np.float32)
        return np.concatenate(out)

    def task_metrics(self, slots: dict[int, dict], active: list[int], task: int) -> TaskMetrics:
        data = self.tasks[task]
        preds = self._predictions(slots, active, task, data.test_images)
        return {"accuracy": accuracy(preds, data.test_labels)}

    def _predictions(
        self, slots: dict[int, dict], active: list[int], task: int, images: np.ndarray
    ) -> np.ndarray:
        """The class ``images`` are predicted as among ``task``'s prompts, with the adapters
        ``active`` (of ``slots``) summed."""
        tokens, valid = self.table.task_tokens(task, self.max_classes)
        return predict_classes(
            self.predict_fn,
            self.mesh,
            self.inference_params(slots, active),
            None,
            self.weights(active),
            images,
            tokens,
            valid,
            self.eval_batch_size,
        )


def build_experiment(
    config: ExperimentConfig, tasks: list[TaskData], mesh: Mesh, base_params: dict
) -> Experiment:
    """Bundle a stream's tasks with the frozen backbone; checks the LoRA target patterns."""
    table = class_table(tasks, config.prompt_template, prompt_encoder(config))
    targets = select_targets(base_params, config.lora.targets)
    return Experiment(config, tasks, table, mesh, base_params, targets)
