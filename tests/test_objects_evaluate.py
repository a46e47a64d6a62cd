"""The object retrieval protocol end to end on synthetic scenes, with embeddings whose quality
is known: colour histograms see the classes (each has its colour), noise sees nothing."""

import numpy as np
import pytest

from mslora_jax.data.proposals import propose_all
from mslora_jax.data.synthetic_scenes import make_scenes
from mslora_jax.objects.evaluate import evaluate_objects


def colour_histogram(crops: np.ndarray) -> np.ndarray:
    """Counts of each crop's pixels in 4 x 4 x 4 colour bins."""
    bins = (crops // 64).reshape(len(crops), -1, 3)
    codes = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    return np.stack([np.bincount(c, minlength=64) for c in codes]).astype(np.float32)


@pytest.fixture(scope="module")
def scenes_and_proposals():
    scenes = make_scenes(12, num_classes=3, image_size=64, seed=9)
    return scenes, propose_all(scenes)


def test_colour_embeddings_retrieve_the_classes_and_noise_does_not(scenes_and_proposals):
    scenes, proposals = scenes_and_proposals
    colour = evaluate_objects(colour_histogram, scenes, proposals, 16)
    rng = np.random.default_rng(0)
    noise = evaluate_objects(lambda c: rng.normal(size=(len(c), 8)), scenes, proposals, 16)
    for iou in ("iou_0.3", "iou_0.5"):
        for where in ("with_own_image", "without_own_image"):
            good, bad = colour[iou][where], noise[iou][where]
            assert good["object_map"] > bad["object_map"] + 0.3, (iou, where, good, bad)
            assert good["recall@1"] >= 0.75  # measured 0.80-0.95
            assert set(good["object_map_per_class"]) == {0, 1, 2}
    # With its own image in the gallery a query's own object is usually its best match.
    assert colour["iou_0.5"]["with_own_image"]["own_object@5"] > 0.5
    assert "own_object@1" not in colour["iou_0.5"]["without_own_image"]
