"""mslora_jax: MSLoRA-CR (per-task LoRA + contrastive regularization) in JAX/Flax."""

__version__ = "0.1.0"
