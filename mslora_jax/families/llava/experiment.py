"""The paper's generative setting: LLaVA-style VQA tasks learned with the same method runner.

``GenerativeExperiment`` plugs the LLaVA model into ``StreamExperiment``: the task loss is
teacher-forced cross-entropy on answer tokens only, batches come from the paper-format VQA
pipeline, and a task's score is its declared primary metric (closed accuracy, F1, BLEU, ...)
over greedy answers generated with the KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tokenizers import Tokenizer

from mslora_jax.config import ExperimentConfig, TaskConfig
from mslora_jax.data.chat_template import ChatTemplate
from mslora_jax.data.conversation import (
    check_tokenizer_fits,
    encode_prompt,
    special_ids,
)
from mslora_jax.data.vqa import VqaExample, VqaTestItem, read_test_file, read_train_file
from mslora_jax.data.vqa_pipeline import vqa_eval_batches, vqa_train_batches
from mslora_jax.errors import ConfigError
from mslora_jax.eval.scoring import score_answers_as
from mslora_jax.losses.answer import answer_cross_entropy
from mslora_jax.models.generate import llava_generate
from mslora_jax.models.llava import Llava, init_llava
from mslora_jax.models.pixels import normalize_images
from mslora_jax.parallel.mesh import process_row_range, to_global_batch
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import born_sharded, sharding_context
from mslora_jax.train.backbone import train_all_params
from mslora_jax.train.stream_experiment import StreamExperiment, TaskMetrics


@dataclasses.dataclass(frozen=True)
class VqaTask:
    name: str
    modality: str
    examples: list[VqaExample]
    test_items: list[VqaTestItem]
    primary_metric: str

    @property
    def num_train(self) -> int:
        return len(self.examples)


def chat_template(config: ExperimentConfig) -> ChatTemplate:
    """The conversation template of ``llava.template`` with ``llava.system_prompt``."""
    return ChatTemplate(config.llava.template, config.llava.system_prompt)


def pixels(config: ExperimentConfig, images: jax.Array) -> jax.Array:
    """uint8 images -> the model's input, normalized as ``llava.image_mean/std`` say, in
    ``llava.dtype``."""
    normalized = normalize_images(images, config.llava.image_mean, config.llava.image_std)
    return normalized.astype(config.llava.dtype)


def cast_floating(tree, dtype: str):
    """Floating-point leaves (arrays or ``ShapeDtypeStruct``s) in ``dtype``; others unchanged."""

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
        return x.astype(jnp.dtype(dtype))

    return jax.tree.map(cast, tree)


def attention_kernel(config: ExperimentConfig, mesh: Mesh) -> str:
    """``llava.attention_kernel`` for the model (None: "xla"); "splash" needs TPU devices."""
    kernel = config.llava.attention_kernel or "xla"
    platform = mesh.devices.flat[0].platform
    if kernel == "splash" and platform != "tpu":
        raise ConfigError(
            f'llava.attention_kernel="splash" is a TPU kernel, but the devices are {platform}; '
            'use "xla" (or "splash_interpret" to check the kernel on any backend, slowly)'
        )
    return kernel


def train_input_options(config: ExperimentConfig) -> dict:
    """``vqa_train_batches``'s reading and cache options from ``train.input_*`` and
    ``train.image_cache_mb`` (those left None keep the pipeline's defaults)."""
    options = config.train.input_options()
    if config.train.image_cache_mb is not None:
        options["image_cache_mb"] = config.train.image_cache_mb
    return options


def load_vqa_task(config: ExperimentConfig, task: TaskConfig) -> VqaTask:
    """Read a task in the paper's format from ``data_dir/<folder or name>/``."""
    folder = Path(config.data_dir) / (task.folder or task.name)
    images = folder / task.image_dir
    return VqaTask(
        task.name,
        task.modality,
        read_train_file(folder / task.train_file, images),
        read_test_file(folder / task.test_file, images),
        task.primary_metric,
    )


def answer_loss(model: Llava, variables, batch: dict, task_weights, rng, deterministic: bool):
    """Mean cross-entropy of the answer tokens (``loss_mask``), predicted from their prefix.

    ``batch["image"]`` holds normalized float images (see ``pixels``). Logits are computed at
    the answer positions only (``losses.answer.answer_cross_entropy``).
    """
    inputs = model.apply(
        variables,
        batch["image"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["loss_mask"],
        method=Llava.prepare_inputs,
    )
    hidden = model.apply(
        variables,
        inputs,
        task_weights,
        deterministic,
        method=Llava.hidden_spliced,
        rngs={"dropout": rng},
    )
    head = lambda h: model.apply(variables, h, method=Llava.head)
    return answer_cross_entropy(head, hidden, inputs.input_ids, inputs.loss_mask)


class GenerativeExperiment(StreamExperiment):
    """LLaVA on VQA tasks; LoRA only in the decoder (see ``LLAVA_LORA_TARGETS``)."""

    model_family = "llava"

    def __init__(
        self,
        config,
        tasks: list[VqaTask],
        tokenizer: Tokenizer,
        mesh,
        base_params,
        targets,
        *,
        max_len: int,
        max_new_tokens: int,
    ):
        check_tokenizer_fits(
            tokenizer, config.llava.decoder.vocab_size, config.llava.image_token_id
        )
        self.model = Llava(
            config.llava.model_config(),
            lora_dropout=config.lora.dropout,
            remat=config.llava.remat,
            query_chunk=config.llava.attention_chunk,
            attention_kernel=attention_kernel(config, mesh),
        )
        self.tokenizer = tokenizer
        self.ids = special_ids(tokenizer, config.llava.image_token_id)
        self.template = chat_template(config)
        self.max_len, self.max_new_tokens = max_len, max_new_tokens
        super().__init__(config, tasks, mesh, base_params, targets)

    def task_loss(self):
        def loss(variables, trainable, context, batch, rng):
            batch = {**batch, "image": pixels(self.config, batch["image"])}
            return answer_loss(self.model, variables, batch, context.forward_weights, rng, False)

        return loss

    def train_batches(
        self, task_indices: list[int], num_steps: int, seed: int, start_step: int = 0
    ):
        examples = [e for i in task_indices for e in self.tasks[i].examples]
        batch_size = self.config.stage_batch_size(task_indices)
        return vqa_train_batches(
            examples,
            self.tokenizer,
            image_size=self.config.llava.vision.image_size,
            max_len=self.max_len,
            batch_size=batch_size,
            num_steps=num_steps,
            seed=seed,
            rows=process_row_range(self.mesh, batch_size),
            start_step=start_step,
            template=self.template,
            image_token_id=self.config.llava.image_token_id,
            pad_to_square=self.config.llava.pad_to_square,
            **self.stage_mixture(task_indices),
            **train_input_options(self.config),
        )

    def answers(self, variables, weights, items: list[VqaTestItem]) -> list[str]:
        """Greedy answers, in fixed-size batches (the last one padded) so one compile serves all."""
        size, pad = self.config.llava.vision.image_size, self.config.llava.pad_to_square
        prompts = [
            encode_prompt(
                self.tokenizer,
                it.question,
                template=self.template,
                image_token_id=self.config.llava.image_token_id,
            )
            for it in items
        ]
        # Data parallel like training: each process builds (decodes) only its devices' rows,
        # each device generates for its rows of the batch.
        batches = vqa_eval_batches(
            [it.image for it in items],
            prompts,
            batch_size=self.eval_batch_size,
            image_size=size,
            pad_id=self.ids.pad,
            rows=process_row_range(self.mesh, self.eval_batch_size),
            pad_to_square=pad,
            **self.config.train.input_options(),
        )
        out = []
        for start, local in zip(range(0, len(items), self.eval_batch_size), batches, strict=True):
            chunk = range(start, min(start + self.eval_batch_size, len(items)))
            batch = to_global_batch(self.mesh, local)
            with sharding_context(self.rules):  # KV cache and activations sharded over batch
                generation = llava_generate(
                    self.model,
                    variables,
                    pixels(self.config, batch["image"]),
                    batch["input_ids"],
                    batch["attention_mask"],
                    weights,
                    max_new_tokens=self.max_new_tokens,
                    stop_ids=(self.ids.eos,),
                    pad_id=self.ids.pad,
                    return_logits=False,
                )
            # Every host gets every answer (a no-op copy on a single process).
            tokens = np.asarray(multihost_utils.process_allgather(generation.tokens, tiled=True))
            for row in range(len(chunk)):
                ids = [int(t) for t in tokens[row] if t not in (self.ids.pad, self.ids.eos)]
                out.append(self.tokenizer.decode(ids).strip())
        return out

    def answer_records(self, slots: dict[int, dict], active: list[int], task: int) -> list[dict]:
        """One record per test item of ``task``: the generated answer beside the reference.

        Keys: ``question_id``, ``image``, ``question``, ``answer``, ``gt``, ``answer_type``,
        ``candidates`` (what LLaVA-Med's answer files hold, plus the reference).
        """
        # The adapters merged into the (sharded) kernels: generation costs what the backbone's
        # does, whatever the number of adapters.
        variables = {"params": self.inference_params(slots, active)}
        items = self.tasks[task].test_items
        answers = self.answers(variables, self.weights(active), items)
        return [
            {
                "question_id": it.question_id,
                "image": str(it.image),
                "question": it.question,
                "answer": answer,
                "gt": it.gt,
                "answer_type": it.answer_type,
                "candidates": list(it.candidates),
            }
            for it, answer in zip(items, answers, strict=True)
        ]

    def task_metrics(self, slots: dict[int, dict], active: list[int], task: int) -> TaskMetrics:
        """The answer metrics (``eval.metrics``: clean or released) over ``task``'s test items
        (NaN means become ``None``)."""
        records = self.answer_records(slots, active, task)
        refs = [
            {"gt": r["gt"], "answer_type": r["answer_type"], "candidates": r["candidates"] or None}
            for r in records
        ]
        scores = score_answers_as(self.config.eval.metrics, [r["answer"] for r in records], refs)
        return {k: None if math.isnan(v) else v for k, v in scores.items()}

    def primary_metric(self, task: int) -> str:
        return self.tasks[task].primary_metric


def pretrain_llava(
    config: ExperimentConfig, tasks: list[VqaTask], tokenizer: Tokenizer, mesh, rng, *, max_len: int
) -> dict:
    """Full training of a fresh LLaVA (vision tower, projector, decoder) on base VQA tasks."""
    check_tokenizer_fits(tokenizer, config.llava.decoder.vocab_size, config.llava.image_token_id)
    cfg = config.pretrain
    model = Llava(
        config.llava.model_config(),
        remat=config.llava.remat,
        query_chunk=config.llava.attention_chunk,
        attention_kernel=attention_kernel(config, mesh),
    )
    init_key, state_key = jax.random.split(rng)
    rules = ShardingRules(mesh, "llava")
    params = born_sharded(lambda key: init_llava(config.llava.model_config(), key), rules, init_key)

    def loss_fn(params, context, batch, rng):
        batch = {**batch, "image": pixels(config, batch["image"])}
        loss = answer_loss(model, {"params": params}, batch, None, rng, True)
        return loss, {"task_loss": loss}

    batches = vqa_train_batches(
        [e for t in tasks for e in t.examples],
        tokenizer,
        image_size=config.llava.vision.image_size,
        max_len=max_len,
        batch_size=cfg.batch_size,
        num_steps=cfg.steps,
        seed=config.seed,
        rows=process_row_range(mesh, cfg.batch_size),
        template=chat_template(config),
        image_token_id=config.llava.image_token_id,
        pad_to_square=config.llava.pad_to_square,
        **train_input_options(config),
    )
    state, _ = train_all_params(
        config, rules, params, loss_fn, batches, state_key, class_tokens=None, desc="pretrain llava"
    )
    return state.trainable
