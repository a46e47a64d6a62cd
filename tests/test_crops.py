"""Region crops: exact crops, the grain stream (threads and worker processes) equal to direct
calls, a bounded image cache, and groups by box-area quantiles."""

import pickle

import numpy as np
import pytest
from PIL import Image

from mslora_jax.data.crops import RegionCrops, area_groups, crop, crop_batches
from mslora_jax.data.synthetic_scenes import make_scenes
from mslora_jax.errors import ConfigError


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(6, image_size=48, seed=2)


def test_a_crop_is_its_box_resized():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    got = crop(image, np.array([3.2, 4.0, 5.5, 6.0]), 8)
    want = np.asarray(Image.fromarray(image[4:10, 3:9]).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(got, want)
    # A box off the edge or thinner than a pixel still gives one pixel's worth.
    assert crop(image, np.array([29.9, 19.5, 0.1, 0.1]), 4).shape == (4, 4, 3)


def test_the_stream_equals_direct_calls_with_threads_and_workers(scenes):
    crops = RegionCrops(scenes, scenes.boxes, scenes.box_image, 16)
    direct = crops(np.arange(len(crops)))
    for prefetch, workers in ((0, 0), (2, 0), (1, 2)):
        batches = list(crop_batches(crops, 7, prefetch=prefetch, num_workers=workers))
        images = np.concatenate([b["image"][b["mask"]] for b in batches])
        rows = np.concatenate([b["row"][b["mask"]] for b in batches])
        np.testing.assert_array_equal(images, direct)
        np.testing.assert_array_equal(rows, np.arange(len(crops)))
        assert all(len(b["image"]) == 7 for b in batches)


def test_the_image_cache_is_bounded_and_not_pickled(scenes):
    crops = RegionCrops(scenes, scenes.boxes, scenes.box_image, 8, cache_mb=0)
    crops(np.arange(len(crops)))
    assert len(crops.cache) == 0  # 0 MiB keeps nothing
    cached = RegionCrops(scenes, scenes.boxes, scenes.box_image, 8, cache_mb=1)
    cached(np.arange(len(cached)))
    assert 0 < cached.cache.nbytes <= 2**20
    clone = pickle.loads(pickle.dumps(cached))
    assert len(clone.cache) == 0
    np.testing.assert_array_equal(clone([0, 3]), cached([0, 3]))


def test_area_groups_split_by_quantiles():
    boxes = np.array([[0, 0, s, s] for s in (1, 2, 3, 4, 5, 6, 7, 8)], np.float32)
    assert area_groups(boxes, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert area_groups(boxes, 1).tolist() == [0] * 8
    equal = np.ones((5, 4), np.float32)
    assert len(set(area_groups(equal, 4).tolist())) == 1  # equal areas share a group
    with pytest.raises(ConfigError, match="num_groups must be >= 1"):
        area_groups(boxes, 0)
