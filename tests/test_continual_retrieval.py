"""The continual retrieval protocol: which encoder embeds what under each index policy, on a
fake experiment whose encoders are known exactly, then end to end on a tiny run."""

import json
import math

import numpy as np
import pytest

from mslora_jax.config import RetrievalConfig, experiment_config
from mslora_jax.continual_retrieval.encoders import StageEncoders
from mslora_jax.continual_retrieval.gallery import gallery_rows
from mslora_jax.continual_retrieval.items import TaskItems, directions, draw, task_items
from mslora_jax.continual_retrieval.protocol import evaluate_method, full_ranking, task_scores
from mslora_jax.errors import CheckpointError, ConfigError, DataError
from mslora_jax.eval.router import fit_router
from mslora_jax.report.results import load_results, validate_results
from mslora_jax.report.retrieval_gallery import plot_gallery
from mslora_jax.report.sweep import summarize
from mslora_jax.report.sweep_files import write_summary
from mslora_jax.retrieval.metrics import ranking_metrics
from mslora_jax.run.experiment import run_experiment
from mslora_jax.train.methods import get_method
from tests.helpers import smoke_config, smoke_dict

DIM = 6


def _rotation(angle: float) -> np.ndarray:
    """A rotation of the first two of DIM dimensions (inner products are kept)."""
    r = np.eye(DIM)
    r[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    return r


class _Rules:
    @staticmethod
    def place(tree):
        return tree


class _Task:
    name = "t"


class FakeExperiment:
    """Item i embeds as ``base[i]``; the encoder summing adapters ``active`` multiplies by each
    active adapter's matrix: ``rotation`` keeps every inner product, ``mix`` does not."""

    rules = _Rules()

    def __init__(self, bases, prompts, adapter_kind="rotation"):
        self.bases, self.prompts, self.kind = bases, prompts, adapter_kind
        self.num_tasks = len(bases)
        self.tasks = [_Task() for _ in bases]

    def method(self, name):
        return get_method(name)

    def _transform(self, slots, active, x):
        for slot in active:
            x = x @ slots[slot]["matrix"]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed_images(self, slots, active, images):
        # An "image" is the row index into the concatenated bases.
        return self._transform(slots, active, np.concatenate(self.bases)[images[:, 0, 0, 0]])

    def embed_class_prompts(self, slots, active, task):
        return self._transform(slots, active, self.prompts[task])

    def embed_texts(self, slots, active, texts):
        # A caption "item <i>" embeds as image i does: a perfect pairing.
        rows = [int(text.split()[1]) for text in texts]
        return self._transform(slots, active, np.concatenate(self.bases)[rows])


def _world(seed=0, tasks=3, classes=2, per_class=6, queries_per_class=3):
    """Bases and items of ``tasks`` tasks with class clusters in DIM dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(tasks, classes, DIM))
    bases, items, prompts, start = [], [], [], 0
    for t in range(tasks):
        labels = np.repeat(np.arange(classes), per_class + queries_per_class)
        x = centres[t][labels] + 0.9 * rng.normal(size=(len(labels), DIM))
        ids = np.arange(start, start + len(labels)).astype(np.uint8)
        start += len(labels)
        images = np.broadcast_to(ids[:, None, None, None], (len(ids), 1, 1, 3)).copy()
        is_query = np.tile(np.arange(per_class + queries_per_class) >= per_class, classes)
        keys = labels + t * classes
        bases.append(x)
        prompts.append(centres[t])
        captions = tuple(f"item {i}" for i in ids[is_query])
        items.append(
            TaskItems(images[~is_query], keys[~is_query], images[is_query], keys[is_query],
                      np.arange(classes) + t * classes, captions,
                      np.array([int(c.split()[1]) for c in captions]))
        )  # fmt: skip
    return bases, items, prompts


def _adapters(kind, tasks, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "rotation":
        return [{"matrix": _rotation(rng.uniform(0.3, 1.5))} for _ in range(tasks)]
    return [{"matrix": np.eye(DIM) + 0.8 * rng.normal(size=(DIM, DIM))} for _ in range(tasks)]


def _evaluate(method, kind, policies=("reindex", "keep", "versioned"), **world):
    bases, items, prompts = _world(**world)
    exp = FakeExperiment(bases, prompts)
    encoders = StageEncoders(exp, exp.method(method), _adapters(kind, len(bases)), items)
    config = RetrievalConfig(index_policy=policies)
    return evaluate_method(encoders, config), items, bases


def _matrix(results, policy, gallery="task", direction="image_to_image", metric="map"):
    return results["policies"][policy][gallery][direction][metric]["matrix"]


def test_full_ranking_breaks_ties_to_the_lower_column_and_leaves_out_unsearched_columns():
    scores = np.array([[0.5, 0.9, 0.5, -np.inf], [-np.inf, -np.inf, 0.1, 0.1]])
    np.testing.assert_array_equal(full_ranking(scores), [[1, 0, 2, -1], [2, 3, -1, -1]])


def test_an_encoder_that_keeps_inner_products_gives_the_frozen_rankings_when_sides_match():
    # seq's encoder after stage k is slot 0 (a rotation): items and queries rotated alike give
    # the frozen backbone's rankings, whichever stage embedded both.
    results, items, bases = _evaluate("seq", "rotation")
    for gallery in ("task", "unified"):
        # versioned: each side by the stage that indexed the part; reindex: both by stage k.
        np.testing.assert_allclose(
            np.array(_matrix(results, "versioned", gallery), float),
            np.array(_matrix(results, "reindex", gallery), float),
        )
    # The value: plain embeddings, ranked by a direct loop.
    x = np.concatenate(bases)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for task, t in enumerate(items):
        q, g = x[t.query_images[:, 0, 0, 0]], x[t.gallery_images[:, 0, 0, 0]]
        ranking = np.argsort(-(q @ g.T), axis=1, kind="stable")
        expected = ranking_metrics(ranking, t.query_keys, t.gallery_keys)["map"]
        for stage in range(task, 3):
            assert _matrix(results, "reindex")[stage][task] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["seq", "mslora", "each"])
def test_versioned_never_forgets_on_a_task_database(method):
    results, _, _ = _evaluate(method, "mix")
    for direction in ("image_to_image", "prompt_to_image"):
        cell = results["policies"]["versioned"]["task"][direction]["map"]
        matrix = cell["matrix"]
        for j in range(3):
            assert all(matrix[k][j] == matrix[j][j] for k in range(j, 3))
        assert cell["forgetting"] == 0.0 and cell["bwt"] == 0.0
    # keep queries an old index with a newer encoder: a changed encoder changes the rankings.
    assert _matrix(results, "keep") != _matrix(results, "versioned")


def test_keep_and_reindex_embed_what_the_policy_says():
    bases, items, prompts = _world()
    exp = FakeExperiment(bases, prompts)
    encoders = StageEncoders(exp, exp.method("mslora"), _adapters("mix", 3), items)
    evaluate_method(encoders, RetrievalConfig(index_policy=("keep",), galleries=("task",)))
    # keep indexes each task once, right after its stage; queries come from every later stage.
    assert {key for key in encoders._memo if key[0] == "gallery"} == {
        ("gallery", j, j) for j in range(3)
    }
    assert encoders.encoded["gallery"] == sum(len(t.gallery_keys) for t in items)
    results = evaluate_method(encoders, RetrievalConfig(index_policy=("reindex", "keep")))
    assert (
        results["cost"]["reindex"]["items_encoded"] == 2 * results["cost"]["keep"]["items_encoded"]
    )  # tasks seen: 1 + 2 + 3 = 6 task databases encoded, against 3


def test_routed_search_reads_only_the_routed_part():
    bases, items, prompts = _world()
    exp = FakeExperiment(bases, prompts)
    encoders = StageEncoders(exp, exp.method("mslora"), _adapters("mix", 3), items)

    class WrongRouter:  # sends every query to task 0
        def routes(self, direction, task, seen):
            n = len(prompts[task] if direction == "prompt_to_image" else items[task].query_keys)
            return np.zeros(n, np.int64)

    config = RetrievalConfig(index_policy=("versioned", "versioned_routed"), galleries=("unified",))
    results = evaluate_method(encoders, config, WrongRouter())
    routed = _matrix(results, "versioned_routed", "unified")
    assert routed[2][1] == 0.0 and routed[2][2] == 0.0  # nothing of theirs in task 0's part
    # Task 0's queries search their own part, with its version: the task database's result.
    versioned_task = evaluate_method(encoders, RetrievalConfig(index_policy=("versioned",)))
    assert routed[2][0] == _matrix(versioned_task, "versioned")[2][0]
    assert "task" not in results["policies"]["versioned_routed"]
    assert results["cost"]["versioned"]["query_encodings"] == 3
    assert results["cost"]["versioned"]["extra_adapter_copies"] == 0


def test_a_run_with_missing_stages_is_refused():
    bases, items, prompts = _world()
    exp = FakeExperiment(bases, prompts)
    with pytest.raises(CheckpointError, match="2 finished stages in its checkpoints, expected 3"):
        StageEncoders(exp, exp.method("seq"), _adapters("mix", 2), items)


def test_item_draws_are_seeded_and_keep_the_class_table_layout():
    assert list(draw(5, 0, np.random.default_rng(0))) == [0, 1, 2, 3, 4]
    chosen = draw(100, 10, np.random.default_rng(0))
    assert len(set(chosen)) == 10 and list(chosen) == sorted(chosen)

    class Data:
        def __init__(self, n, classes):
            self.train_images = np.zeros((n, 2, 2, 3), np.uint8)
            self.test_images = np.zeros((n, 2, 2, 3), np.uint8)
            self.train_labels = self.test_labels = np.arange(n) % classes
            self.num_classes, self.has_captions = classes, False

    config = RetrievalConfig(gallery_per_task=4, queries_per_task=2)
    items = task_items([Data(10, 3), Data(8, 2)], config, seed=0)
    assert [len(t.gallery_keys) for t in items] == [4, 4]
    assert list(items[1].prompt_keys) == [3, 4] and items[1].gallery_keys.min() >= 3
    again = task_items([Data(10, 3), Data(8, 2)], config, seed=0)
    np.testing.assert_array_equal(items[0].gallery_keys, again[0].gallery_keys)


def test_the_router_routes_among_the_tasks_seen():
    router = fit_router([np.eye(3)[:1], np.eye(3)[1:2]], [np.zeros(1), np.zeros(1)])
    x = np.array([[0.1, 1.0, 0.0]])
    assert router.route(x)[0] == 1 and router.route(x, among=[0])[0] == 0
    with pytest.raises(DataError, match=r"no prototype belongs to the tasks \[5\]"):
        router.route(x, among=[5])


@pytest.mark.parametrize(
    "retrieval, message",
    [
        ({"index_policy": ["rebuild"]}, r"unknown \['rebuild'\]"),
        ({"galleries": []}, "retrieval.galleries is empty"),
        ({"directions": ["image_to_image", "image_to_image"]}, "repeated entries"),
        ({"gallery_per_task": -1}, "expected >= 0"),
    ],
)
def test_bad_retrieval_settings_are_refused_by_name(retrieval, message):
    with pytest.raises(ConfigError, match=message):
        smoke_config(retrieval=retrieval)


def test_a_generative_run_refuses_retrieval():
    cfg = smoke_dict(retrieval={"enabled": True})
    cfg["model_kind"] = "llava"
    with pytest.raises(ConfigError, match="retrieval.enabled needs image and text embeddings"):
        experiment_config(cfg)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("retrieval")
    cfg = smoke_dict(
        methods=("seq", "mslora", "joint"),
        num_devices=1,
        retrieval={"enabled": True, "gallery_per_task": 48, "queries_per_task": 24},
        **{"train.steps_per_task": 8, "pretrain.steps": 10, "model.max_text_len": 12},
    )
    for task in cfg["stream"]:  # captioned: trained on image-caption pairs
        task["captions"] = True
    return workdir, run_experiment(experiment_config(cfg), workdir)


def test_a_run_writes_retrieval_matrices_tables_and_heatmaps(retrieval_run):
    workdir, results = retrieval_run
    assert load_results(workdir / "results.json")["retrieval"] == json.loads(
        json.dumps(results["retrieval"])
    )
    assert (workdir / "retrieval_matrices.png").stat().st_size > 0
    assert (workdir / "retrieval_gallery.png").stat().st_size > 0
    report = (workdir / "results.md").read_text()
    assert "## Retrieval" in report and "**image to image, unified database**" in report
    methods = results["retrieval"]["methods"]
    assert len(_matrix(methods["joint"], "keep")) == 1  # one stage
    for method in ("seq", "mslora"):
        cell = methods[method]["policies"]["versioned"]["task"]["image_to_image"]["map"]
        assert cell["forgetting"] == 0.0  # the exact encoder of each part, rebuilt
    assert methods["seq"]["cost"]["versioned"]["extra_adapter_copies"] == 2
    assert methods["mslora"]["cost"]["versioned"]["extra_adapter_copies"] == 0
    assert len(results["retrieval"]["router_acc"]) == 3
    assert results["retrieval"]["settings"]["directions"] == [
        "image_to_image", "prompt_to_image", "text_to_image", "image_to_text"
    ]  # fmt: skip
    assert "**text to image, unified database**" in report


def test_retrieval_results_are_checked(retrieval_run):
    _, results = retrieval_run
    bad = json.loads(json.dumps(results))
    cell = bad["retrieval"]["methods"]["seq"]["policies"]["keep"]["task"]["image_to_image"]
    cell["map"]["avg"] += 0.1
    with pytest.raises(DataError, match=r"\['map'\]\['avg'\]: is .* but the matrix gives"):
        validate_results(bad)


def test_a_sweep_summarizes_retrieval_with_paired_policy_differences(retrieval_run, tmp_path):
    _, results = retrieval_run
    other = json.loads(json.dumps(results))
    policies = other["retrieval"]["methods"]["seq"]["policies"]
    policies["keep"]["task"]["image_to_image"]["map"]["avg"] -= 0.1
    summary = summarize([results, other], [0, 1])
    seq = summary["retrieval"]["methods"]["seq"]
    keep, reindex = (
        [r["retrieval"]["methods"]["seq"]["policies"][p]["task"]["image_to_image"]["map"]["avg"]
         for r in (results, other)]
        for p in ("keep", "reindex")
    )  # fmt: skip
    assert seq["keep"]["task/image_to_image"]["avg"]["values"] == keep
    paired = summary["retrieval"]["paired"]["seq"]["keep - reindex"]["task/image_to_image"]
    assert paired["avg"]["mean"] == pytest.approx(np.mean(np.subtract(keep, reindex)))
    assert paired["avg"]["n"] == 2
    assert "versioned - keep" in summary["retrieval"]["paired"]["mslora"]
    write_summary(tmp_path, summary)
    text = (tmp_path / "summary.md").read_text()
    assert "## Retrieval (map), n = 2 seeds" in text
    assert "keep - reindex, task/image to image" in text


def test_instance_directions_find_each_images_own_caption():
    # Captions embed exactly as their images (FakeExperiment.embed_texts): with versioned
    # encoders every caption finds its image first, and every image its caption.
    bases, items, prompts = _world()
    exp = FakeExperiment(bases, prompts)
    encoders = StageEncoders(exp, exp.method("mslora"), _adapters("mix", 3), items)
    config = RetrievalConfig(index_policy=("versioned", "keep"))
    results = evaluate_method(encoders, config, directions=("text_to_image", "image_to_text"))
    for direction in ("text_to_image", "image_to_text"):
        for gallery in ("task", "unified"):
            recall = results["policies"]["versioned"][gallery][direction]["recall@1"]["matrix"]
            assert all(x == 1.0 for row in recall for x in row if x is not None)
    # keep embeds the two sides with different encoders: no longer a perfect pairing.
    keep = results["policies"]["keep"]["task"]["text_to_image"]["recall@1"]["avg"]
    assert keep < 1.0
    # The database of text_to_image holds test images: their count, not the gallery's.
    scores, keys = task_scores(encoders, "keep", "task", "text_to_image", 2, 1)
    assert scores.shape == (len(items[1].captions), len(items[1].query_keys))
    np.testing.assert_array_equal(keys, items[1].caption_keys)


def test_the_directions_follow_the_streams_captions():
    class Task:
        def __init__(self, name, captioned):
            self.name, self.has_captions = name, captioned

    both = [Task("a", True), Task("b", True)]
    mixed = [Task("a", True), Task("b", False)]
    assert directions(both, RetrievalConfig()) == (
        "image_to_image", "prompt_to_image", "text_to_image", "image_to_text"
    )  # fmt: skip
    assert directions(mixed, RetrievalConfig()) == ("image_to_image", "prompt_to_image")
    with pytest.raises(DataError, match="task 'b' has no captions"):
        directions(mixed, RetrievalConfig(directions=("text_to_image",)))


def test_the_gallery_shows_each_tasks_queries_with_framed_results():
    bases, items, prompts = _world()
    exp = FakeExperiment(bases, prompts)
    encoders = StageEncoders(exp, exp.method("mslora"), _adapters("mix", 3), items)
    rows = gallery_rows(encoders, "versioned", "unified", ("image_to_image", "text_to_image"))
    assert len(rows) == 6 and all(len(r.results) == 5 for r in rows)
    image_row, text_row = rows[2], rows[3]  # task 1
    assert image_row.query_image is not None and text_row.query_text == items[1].captions[0]
    # A caption embeds as its image: its own image comes first, and is relevant.
    first_image, relevant, score = text_row.results[0]
    np.testing.assert_array_equal(first_image, items[1].query_images[0])
    assert relevant and score == pytest.approx(1.0)
    # Image queries: relevant = a training image of the query's class and task.
    scores, keys = task_scores(encoders, "versioned", "unified", "image_to_image", 2, 1)
    ranking = full_ranking(scores[:1])[0, :5]
    assert [r[1] for r in image_row.results] == list(keys[ranking] == items[1].query_keys[0])
    figure = plot_gallery(rows, "title")
    assert len(figure.axes) == 6 * 6
