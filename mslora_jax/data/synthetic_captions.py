"""Captions of synthetic images, written from the latent factors that render them.

A synthetic image is its class prototype plus within-class jitter in a small latent box, rendered
by its modality's renderer (``data.synthetic``). Its caption names the modality and the class,
then four of those factors, each at one of five levels: "pathology velorin with high striping
low nuclei moderate chromatin marked eosin". Images of one class differ in their factors, so a
caption picks out its own image (and the few that share its levels) rather than its class:
instance-level text-to-image retrieval is meaningful, not just class matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVELS = ("minimal", "low", "moderate", "high", "marked")
# Modality -> (latent dimension, word) of the factors a caption describes: what each renderer
# draws from that dimension (data.synthetic's _render_* functions).
FACTORS: dict[str, tuple[tuple[int, str], ...]] = {
    "pathology": ((1, "striping"), (2, "nuclei"), (3, "chromatin"), (4, "eosin")),
    "radiology": ((0, "elongation"), (1, "rotation"), (2, "lesion"), (3, "contrast")),
    "dermatology": ((0, "pigment"), (1, "size"), (3, "border"), (4, "centre")),
}
CAPTION_WORDS = 3 + 2 * 4  # modality, class, "with", then four (level, factor) pairs


def level(value: np.ndarray) -> np.ndarray:
    """The level index (0..4) of latent values in [0, 1]: five equal bins."""
    return np.minimum((np.asarray(value) * len(LEVELS)).astype(np.int64), len(LEVELS) - 1)


def captions(
    modality: str, class_names: Sequence[str], labels: np.ndarray, latents: np.ndarray
) -> tuple[str, ...]:
    """One caption per image from its class and its latent point (``latents[i]``, after the
    within-class jitter that rendered image i)."""
    factors = FACTORS[modality]
    levels = level(latents[:, [dim for dim, _ in factors]])
    return tuple(
        f"{modality} {class_names[label]} with "
        + " ".join(f"{LEVELS[lv]} {word}" for lv, (_, word) in zip(row, factors, strict=True))
        for label, row in zip(labels, levels, strict=True)
    )
