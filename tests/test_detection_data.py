"""Detection data: synthetic scenes, and COCO files written and read back, bad ones refused."""

import json

import numpy as np
import pytest

from mslora_jax.data.coco import read_coco, write_coco
from mslora_jax.data.synthetic_scenes import SIZE_FRACTIONS, make_scenes
from mslora_jax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(24, num_classes=3, image_size=48, seed=3)


def test_scenes_are_seeded_and_their_boxes_lie_in_their_images(scenes):
    again = make_scenes(24, num_classes=3, image_size=48, seed=3)
    np.testing.assert_array_equal(scenes.boxes, again.boxes)
    np.testing.assert_array_equal(scenes.pixels[5], again.pixels[5])
    assert not np.array_equal(make_scenes(2, seed=4).pixels[0], make_scenes(2, seed=3).pixels[0])
    x, y, w, h = scenes.boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 48).all() and (y + h <= 48).all()
    assert set(scenes.box_class.tolist()) == {0, 1, 2}
    assert all(len(scenes.boxes_of(i)) >= 1 for i in range(scenes.num_images))
    # Classes differ in typical size, and each class spans several sizes.
    sides = np.sqrt(w * h)
    medians = [np.median(sides[scenes.box_class == c]) for c in range(3)]
    assert medians == sorted(medians)
    for c in range(3):
        mine = sides[scenes.box_class == c]
        assert mine.max() > 1.2 * mine.min()
    expected = [f * 48 for f in SIZE_FRACTIONS]
    assert np.allclose(medians, expected, rtol=0.35)


def test_objects_are_visible_in_their_boxes(scenes):
    # Objects are darker than the pale background: every box is darker on average than its
    # image's median pixel.
    for j in range(len(scenes.boxes)):
        x, y, w, h = scenes.boxes[j].astype(int)
        image = scenes.image(int(scenes.box_image[j])).astype(float).mean(axis=-1)
        assert image[y : y + h, x : x + w].mean() < np.median(image) - 20, j


def test_coco_files_round_trip(scenes, tmp_path):
    path = write_coco(scenes, tmp_path, "train")
    back = read_coco(path)
    np.testing.assert_allclose(back.boxes, scenes.boxes, atol=0.01)
    np.testing.assert_array_equal(back.box_image, scenes.box_image)
    np.testing.assert_array_equal(back.box_class, scenes.box_class)
    assert back.class_names == scenes.class_names and back.name == "instances_train"
    np.testing.assert_array_equal(back.image(3), scenes.image(3))  # PNG is lossless
    assert back.sizes.tolist()[0] == [48, 48]


def _coco(tmp_path, drop=None, **changes):
    from PIL import Image

    (tmp_path / "images").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "images/a.png", "width": 30, "height": 20}],
        "annotations": [{"id": 0, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 5]}],
        "categories": [{"id": 3, "name": "cell"}],
    }
    for key, value in changes.items():
        section, field = key.split("__") if "__" in key else (key, None)
        if field is None:
            data[section] = value
        else:
            data[section][0][field] = value
    if drop is not None:
        del data[drop[0]][0][drop[1]]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_a_good_file_reads(tmp_path):
    d = read_coco(_coco(tmp_path))
    assert d.class_names == ("cell",) and d.box_class.tolist() == [0]
    assert d.boxes.tolist() == [[1, 2, 10, 5]] and d.image(0).shape == (20, 30, 3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"annotations__bbox": [25, 2, 10, 5]}, r"annotations\[0\]: bbox .* outside its 30x20"),
        ({"annotations__bbox": [1, 2, 0, 5]}, r"annotations\[0\]: bbox .* has no area"),
        ({"annotations__bbox": [1, 2, 5]}, r"bbox must be \[x, y, width, height\]"),
        ({"annotations__category_id": 9}, r"category_id 9 is not in 'categories'"),
        ({"annotations__image_id": 8}, r"image_id 8 is not in 'images'"),
        ({"images__file_name": "images/b.png"}, r"images\[0\]: image file .*b.png not found"),
        ({"categories": "cell"}, r"'categories' must be a list"),
        ({"drop": ("images", "width")}, r"images\[0\]: missing key 'width'"),
        ({"images__height": "tall"}, r"images\[0\]: width and height must be positive"),
        ({"drop": ("annotations", "bbox")}, r"annotations\[0\]: missing key 'bbox'"),
    ],
)
def test_bad_coco_files_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(DataError, match=message):
        read_coco(_coco(tmp_path, **changes))


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_coco(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON file"):
        read_coco(tmp_path / "bad.json")


def test_bad_scene_settings_are_refused():
    with pytest.raises(ConfigError, match="num_classes must be in 1..6"):
        make_scenes(1, num_classes=7)
    with pytest.raises(ConfigError, match="objects_per_image"):
        make_scenes(1, objects_per_image=(3, 2))
