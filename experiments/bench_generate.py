"""Benchmark: batched greedy generation speed (KV cache) of the LLaVA model of a config.

Prints figures; asserts nothing. Parameters are random (speed does not depend on their values)
and no stop token is used, so every row generates ``--new_tokens`` tokens.

    python experiments/bench_generate.py [--config configs/demo_generative.py] [--batch 64]
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from mslora_jax.config import experiment_config
from mslora_jax.models.generate import llava_generate
from mslora_jax.models.llava import Llava, init_llava

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo_generative.py", "Config.")
_BATCH = flags.DEFINE_integer("batch", 64, "Prompts per batch.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Text tokens per prompt (one is <image>).")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after the compiling one.")


def main(argv):
    del argv
    config = experiment_config(_CONFIG.value)
    cfg = config.llava.model_config()
    model = Llava(cfg)
    params = init_llava(cfg, jax.random.PRNGKey(0))
    size = cfg.vision.image_size
    images = jax.random.uniform(jax.random.PRNGKey(1), (_BATCH.value, size, size, 3)) * 2 - 1
    ids = jax.random.randint(jax.random.PRNGKey(2), (_BATCH.value, _PROMPT.value), 5, 100)
    ids = ids.at[:, 1].set(cfg.image_token_id)
    mask = jnp.ones_like(ids, bool)

    def generate():
        out = llava_generate(
            model,
            {"params": params},
            images,
            ids,
            mask,
            max_new_tokens=_NEW.value,
            return_logits=False,
        )
        return jax.block_until_ready(out.tokens)

    t0 = time.perf_counter()
    generate()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(_REPEATS.value):
        generate()
    seconds = (time.perf_counter() - t0) / _REPEATS.value
    print(
        json.dumps(
            {
                "platform": jax.devices()[0].platform,
                "batch": _BATCH.value,
                "prompt_tokens": _PROMPT.value + cfg.num_patches - 1,
                "new_tokens": _NEW.value,
                "tokens_per_s": round(_BATCH.value * _NEW.value / seconds, 1),
                "seconds_per_batch": round(seconds, 4),
                "first_call_s_incl_compile": round(first, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
