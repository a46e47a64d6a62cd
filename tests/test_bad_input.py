"""Bad input through the command line, one case per kind: one clear line, exit code 2, and a
workdir left as it was.

Each case builds its bad input under ``tmp_path`` and runs ``mslora-jax run`` or ``inspect`` in
this process through ``cli.main.main``, the installed command's parsing and exit codes (a
subprocess would add seconds of imports per case). Almost every case fails while the config or
the data is read, before anything is compiled; those on an existing workdir work on a copy of
one small finished run (``good_run``). docs/command_line.md ("Checkpoints and resuming") quotes
the count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mslora_jax.cli import main as cli
from mslora_jax.config import synthetic_task
from mslora_jax.data.conversation import build_tokenizer, save_tokenizer
from mslora_jax.data.synthetic import SyntheticTaskSpec
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from tests.helpers import ROOT, load_config_file, smoke_dict

# --- running the command ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str


def _cli(*args) -> Outcome:
    """``mslora-jax ARGS`` in this process (``cli.main.main``: the installed command's parsing,
    output and exit codes): exit code and what it wrote to stderr. An exception that escapes is
    printed as the interpreter would (a traceback, exit code 1)."""
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(["mslora-jax", *map(str, args)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    return Outcome(code, stderr.getvalue())


def _snapshot(workdir: Path) -> dict:
    """Every file's bytes and mtime, and every folder, under ``workdir``."""
    return {
        str(p.relative_to(workdir)): (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file()
            else "dir"
        )
        for p in sorted(workdir.rglob("*"))
    }


# --- configs and data ----------------------------------------------------------------------


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({cfg!r})\n"
    )
    return path


def _set(cfg: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[leaf] = value
    return cfg


def _stream(count: int = 2) -> list[dict]:
    """The first ``count`` of three small synthetic tasks."""
    tasks = [("a", "pathology", 11), ("b", "radiology", 21), ("c", "pathology", 12)]
    return [
        synthetic_task(name, modality, seed, num_classes=3, num_train=32, num_test=16)
        for name, modality, seed in tasks[:count]
    ]


def _dual(**overrides) -> dict:
    """configs/smoke.py at its smallest: one method, two small tasks, a random backbone."""
    return smoke_dict(
        **{
            "methods": ("seq",),
            "num_devices": 1,
            "backbone.source": "random",
            "base_tasks": [],
            "stream": _stream(),
            "train.batch_size": 16,
            "train.steps_per_task": 2,
            "train.eval_batch_size": 16,
            **overrides,
        }
    )


def _llava(data_dir: Path, **overrides) -> dict:
    """configs/demo_generative.py on one VQA task read from ``data_dir/v``."""
    cfg = load_config_file("demo_generative.py").to_dict()
    cfg.update(
        methods=("seq",),
        num_devices=1,
        base_tasks=[],
        progress=False,
        data_dir=str(data_dir),
        backbone={"source": "random"},
        stream=[{"name": "v", "modality": "pathology", "source": "vqa"}],
    )
    cfg["train"].update(batch_size=4, steps_per_task=2, eval_batch_size=4)
    for dotted, value in overrides.items():
        _set(cfg, dotted, value)
    return cfg


def _run(tmp: Path, cfg: dict) -> list:
    """``run`` arguments for config ``cfg`` (written to tmp/config.py) on a fresh workdir."""
    return ["run", "--config", _write_config(tmp / "config.py", cfg), "--workdir", tmp / "work"]


def _npz_arrays(train: int = 12, test: int = 6, classes: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    return arrays


def _medmnist(change: Callable[[dict], object] = lambda a: None, raw=None, **task):
    """A run on one medmnist task whose d.npz is ``_npz_arrays()`` after ``change`` (or the
    bytes ``raw(good file bytes)``)."""

    def build(tmp: Path, work: Path | None) -> list:
        arrays = _npz_arrays()
        change(arrays)
        np.savez(tmp / "d.npz", **arrays)
        if raw is not None:
            (tmp / "d.npz").write_bytes(raw((tmp / "d.npz").read_bytes()))
        entry = {"name": "real", "modality": "radiology", "source": "medmnist", "file": "d.npz"}
        stream = [{**entry, "class_names": ["a", "b"], **task}]
        cfg = _dual(stream=stream, data_dir=str(tmp), **{"train.batch_size": 4})
        return _run(tmp, cfg)

    return build


def _tfds(**task):
    """A run on one tfds task under an empty data_dir (nothing prepared there)."""

    def build(tmp: Path, work: Path | None) -> list:
        entry = {"name": "pcam", "modality": "pathology", "source": "tfds"}
        stream = [{**entry, "tfds_name": "patch_camelyon", **task}]
        return _run(tmp, _dual(stream=stream, data_dir=str(tmp), **{"train.batch_size": 4}))

    return build


def _vqa(change: Callable[[Path], object] = lambda folder: None, **overrides):
    """A generative run on one VQA task written by the synthetic writer, then ``change``d;
    an override whose value is callable gets the case's tmp folder."""

    def build(tmp: Path, work: Path | None) -> list:
        spec = SyntheticTaskSpec("v", "pathology", 3, seed=5)
        write_synthetic_vqa_task(spec, tmp / "data" / "v", image_size=16, num_train=8, num_test=4)
        change(tmp / "data" / "v")
        values = {k: v(tmp) if callable(v) else v for k, v in overrides.items()}
        return _run(tmp, _llava(tmp / "data", **values))

    return build


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "train.json").read_text())


def _edit_train(edit: Callable[[list], object]):
    return lambda folder: (folder / "train.json").write_text(json.dumps(edit(_records(folder))))


def _edit_test_line(number: int, edit: Callable[[dict], dict]):
    def change(folder: Path) -> None:
        lines = (folder / "test.jsonl").read_text().splitlines()
        lines[number - 1] = json.dumps(edit(json.loads(lines[number - 1])))
        (folder / "test.jsonl").write_text("\n".join(lines) + "\n")

    return change


def _tokenizer(tmp: Path, special_tokens: list[str] | None = None, vocab_size: int = 300) -> str:
    """A tokenizer.json built on a few words; only its special tokens and size matter."""
    if special_tokens is None:
        tokenizer = build_tokenizer(["a chest image"] * 3, vocab_size)
    else:  # build_tokenizer insists on LLaVA's special tokens; this one has not got them
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False
        )
        tokenizer.train_from_iterator(["a chest image"], trainer)
    save_tokenizer(tokenizer, tmp / "tok.json")
    return str(tmp / "tok.json")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _config_file(cfg: dict, *extra: str):
    """A run on the config file ``cfg`` with command-line ``extra`` flags (fresh workdir)."""
    return lambda tmp, work: [*_run(tmp, cfg), *extra]


def _flags(*extra: str):
    """A run on ``_dual()`` with command-line ``extra`` flags."""
    return _config_file(_dual(), *extra)


# --- the existing workdir -------------------------------------------------------------------

GOOD = _dual()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A finished run of ``GOOD`` (seq over two tasks, two steps each); cases copy it."""
    tmp = tmp_path_factory.mktemp("good")
    outcome = _cli(
        "run", "--config", _write_config(tmp / "config.py", GOOD), "--workdir", tmp / "w"
    )
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert (tmp / "w" / "results.json").exists()
    return tmp / "w"


def _resume(cfg: dict, *extra: str):
    """A rerun on a copy of ``good_run`` with config ``cfg`` and command-line ``extra``."""

    def build(tmp: Path, work: Path) -> list:
        path = _write_config(tmp / "config.py", cfg)
        return ["run", "--config", path, "--workdir", work, *extra]

    return build


def _after(change: Callable[[Path], object], build):
    """``build``, once ``change(work)`` has damaged the workdir copy (before its snapshot)."""

    def run(tmp: Path, work: Path) -> list:
        change(work)
        return build(tmp, work)

    return run


def _inspect(*extra: str, change: Callable[[Path], object] = lambda work: None):
    def build(tmp: Path, work: Path | None) -> list:
        change(work or tmp / "work")
        return ["inspect", "--workdir", work or tmp / "work", *extra]

    return build


def _corrupt_adapter(work: Path) -> None:
    """Cut the largest array file of seq's stage-0 adapter in half (a partly copied folder)."""
    files = [p for p in (work / "checkpoints/seq/0/adapter").rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


# --- the cases -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[Path, Path | None], list]  # (tmp, copy of good_run or None) -> arguments
    message: str  # regex over the error line: the file or key, and what was expected
    existing: bool = False  # on a copy of good_run (else a workdir that does not exist yet)
    strict: bool = True  # exit code 2 with one "error:" line; else any non-zero code


def case(id_, *args, marks=(), **kwargs):
    return pytest.param(Case(*args, **kwargs), id=id_, marks=marks)


CASES = [
    # Config keys and values: refused while the config is converted, before any workdir exists.
    case(
        "config-unknown-key-in-file",
        _config_file(_set(_dual(), "lora.rnk", 3)),
        r"unknown key\(s\) \['config\.lora\.rnk'\]; known: \[.*'rank'",
    ),
    case(
        "config-unknown-key-on-command-line",
        _flags("--config.lora.rnk=3"),
        r"--config\.lora\.rnk: no key lora\.rnk in .*; did you mean lora\.rank\?",
    ),
    case(
        "config-value-not-a-number",
        _flags("--config.lora.rank=abc"),
        r"--config\.lora\.rank=abc: expected int",
    ),
    case(
        "config-wrong-type-in-file",
        _config_file(_set(_dual(), "lora.rank", "2")),
        r"config\.lora\.rank must be int, got '2'",
    ),
    case("config-rank-0", _flags("--config.lora.rank=0"), r"lora\.rank must be >= 1, got 0"),
    case(
        "config-negative-steps",
        _flags("--config.train.steps_per_task=-1"),
        r"train\.steps_per_task must be >= 0",
    ),
    case(
        "config-unknown-method",
        _flags("--config.methods=('seq','icarl')"),
        r"unknown method 'icarl'; expected one of \('each'",
    ),
    case(
        "config-unknown-task-source",
        _config_file(_set(_dual(), "stream", [{**_stream()[0], "source": "kaggle"}])),
        r"task 'a': source='kaggle' is unknown; expected one of \('synthetic'",
    ),
    case(
        "config-unknown-backbone-source",
        _flags("--config.backbone.source=download"),
        r"backbone\.source='download' is unknown; expected one of",
    ),
    case(
        "config-mesh-size-0",
        _flags("--config.mesh.data=0"),
        r"mesh\.data/fsdp/tensor = \(0, 1, 1\): sizes must be >= 1",
    ),
    case(
        "config-mesh-does-not-divide-devices",
        _flags("--config.mesh.fsdp=3"),
        r"mesh \(data, fsdp, tensor\) = \(-1, 3, 1\): 1 devices are not divisible by 3",
    ),
    case(
        "config-more-devices-than-visible",
        _flags("--config.num_devices=99"),
        r"num_devices=99 but only \d+ devices are visible",
    ),
    case(
        "config-empty-synthetic-split",
        _config_file(_set(_dual(), "stream", [{**_stream()[0], "num_test": 0}])),
        r"task 'a': num_train and num_test must be >= 1",
    ),
    case(
        "config-batch-larger-than-task",
        _flags("--config.train.batch_size=64"),
        r"task 'a' has 32 training examples, fewer than its batch size 64",
    ),
    case(
        "config-file-missing",
        lambda tmp, work: ["run", "--config", tmp / "nowhere.py", "--workdir", tmp / "work"],
        r"--config .*nowhere\.py: file not found",
    ),
    case(
        "config-not-given",
        lambda tmp, work: ["run", "--workdir", tmp / "work"],
        r"run needs --config",
    ),
    # MedMNIST .npz files: the file named, and what was expected of it.
    case(
        "npz-truncated",
        _medmnist(raw=lambda data: data[: len(data) // 2]),
        r"d\.npz: not a valid \.npz file, corrupt or truncated",
    ),
    case(
        "npz-not-an-archive",
        _medmnist(raw=lambda data: b"train_images,train_labels\n"),
        r"d\.npz: not a valid \.npz file",
    ),
    case("npz-missing", _medmnist(file="nowhere.npz"), r"nowhere\.npz: file not found"),
    case(
        "tfds-dataset-not-prepared",
        _tfds(tfds_data_dir="tfds"),
        r"patch_camelyon.*not prepared \(no .*tfds/patch_camelyon/\.\.\./dataset_info\.json",
    ),
    case(
        "tfds-without-a-name",
        _tfds(tfds_name=""),
        r"task 'pcam': .*tfds_name",
    ),
    case(
        "npz-missing-array",
        _medmnist(lambda a: a.pop("test_labels")),
        r"d\.npz: missing key 'test_labels' \(file has \['test_images'",
    ),
    case(
        "npz-wrong-image-shape",
        _medmnist(lambda a: a.update(train_images=np.zeros((12, 8, 8, 2), np.uint8))),
        r"d\.npz: train_images must be \[N, H, W\] or \[N, H, W, 3\], got shape \(12, 8, 8, 2\)",
    ),
    case(
        "npz-float-labels",
        _medmnist(lambda a: a.update(train_labels=a["train_labels"].astype(np.float32))),
        r"d\.npz: train_labels must be integers, got float32",
    ),
    case(
        "npz-labels-and-images-differ-in-length",
        _medmnist(lambda a: a.update(test_labels=a["test_labels"][:4])),
        r"d\.npz: test_labels has 4 entries but test_images has 6 images",
    ),
    case(
        "npz-label-out-of-range-for-class-names",
        _medmnist(lambda a: a.update(train_labels=np.arange(12, dtype=np.uint8) % 3)),
        r"d\.npz: train_labels contains label 2 outside class_names \(expected 0\.\.1",
    ),
    case(
        "npz-requested-label-absent",
        _medmnist(labels=[1, 5]),
        r"d\.npz: requested label id 5 not present in train_labels",
    ),
    case(
        "npz-empty-train-split",
        _medmnist(lambda a: a.update(_npz_arrays(train=0))),
        r"d\.npz: the train split has no images",
    ),
    case(
        "npz-empty-test-split-for-the-chosen-labels",
        _medmnist(
            lambda a: a.update(test_labels=np.zeros((6, 1), np.uint8)),
            labels=[1],
            class_names=["b"],
        ),
        r"d\.npz: the test split has no images with label ids \[1\]",
    ),
    # VQA files (the paper's JSON and JSONL): the file, and the record or line.
    case(
        "vqa-train-json-truncated",
        _vqa(lambda f: _write(f / "train.json", (f / "train.json").read_text()[:300])),
        r"v/train\.json: malformed JSON at line \d+ column \d+",
    ),
    case(
        "vqa-train-json-not-a-list",
        _vqa(_edit_train(lambda records: {"records": records})),
        r"v/train\.json: expected a JSON list of records, got dict",
    ),
    case(
        "vqa-train-record-missing-key",
        _vqa(_edit_train(lambda r: [{"id": 0, "image": r[0]["image"]}, *r[1:]])),
        r"v/train\.json: record 0: missing key 'conversations'",
    ),
    case(
        "vqa-train-no-answer",
        _vqa(_edit_train(lambda r: [{**r[0], "conversations": r[0]["conversations"][:1]}, *r[1:]])),
        r"v/train\.json: record 0 \(id '0'\): the last human turn has no gpt answer",
    ),
    case(
        "vqa-train-file-missing",
        _vqa(lambda f: os.remove(f / "train.json")),
        r"v/train\.json: file not found",
    ),
    case(
        "vqa-test-jsonl-malformed-line",
        _vqa(lambda f: _write(f / "test.jsonl", (f / "test.jsonl").read_text()[:-40])),
        r"v/test\.jsonl: line 4: malformed JSON",
    ),
    case(
        "vqa-test-bad-answer-type",
        _vqa(_edit_test_line(2, lambda r: {**r, "answer_type": "MAYBE"})),
        r"v/test\.jsonl: line 2 \(question_id '1'\): answer_type must be OPEN or CLOSED",
    ),
    case(
        "vqa-test-duplicate-question-id",
        _vqa(_edit_test_line(3, lambda r: {**r, "question_id": 0})),
        r"v/test\.jsonl: line 3: question_id '0' already used on line 1",
    ),
    case(
        "vqa-test-file-empty",
        _vqa(lambda f: _write(f / "test.jsonl", "\n")),
        r"v/test\.jsonl: the file holds no records",
    ),
    case(
        "vqa-train-image-missing",
        _vqa(lambda f: os.remove(f / "images" / _records(f)[0]["image"])),
        r"v/train\.json: record 0 \(id '0'\): image 'train_000000\.png' not found "
        r"\(looked for .*v/images/train_000000\.png\)",
    ),
    case(
        "vqa-test-image-missing",
        _vqa(lambda f: os.remove(f / "images" / "test_000002.png")),
        r"v/test\.jsonl: line 3 \(question_id '2'\): image 'test_000002\.png' not found",
    ),
    # Tokenizer files that do not fit the model.
    case(
        "tokenizer-larger-than-the-model-vocabulary",
        _vqa(**{"llava.tokenizer_file": _tokenizer, "llava.decoder.vocab_size": 260}),
        r"tok\.json: the tokenizer has \d+ tokens but llava\.decoder\.vocab_size is 260",
    ),
    case(
        "tokenizer-without-special-tokens",
        _vqa(**{"llava.tokenizer_file": lambda t: _tokenizer(t, ["<pad>", "<unk>"])}),
        r"tok\.json: tokenizer has no special token '<s>'",
    ),
    case(
        "tokenizer-other-image-token-id",
        _vqa(**{"llava.tokenizer_file": _tokenizer, "llava.image_token_id": 7}),
        r"tok\.json: the tokenizer's '<image>' has id 4 but llava\.image_token_id is 7",
    ),
    case(
        "tokenizer-not-json",
        _vqa(**{"llava.tokenizer_file": lambda t: str(_write(t / "tok.json", "{not json"))}),
        r"tok\.json: not a valid tokenizer\.json",
    ),
    case(
        "tokenizer-file-missing",
        _vqa(**{"llava.tokenizer_file": lambda t: str(t / "nowhere.json")}),
        r"nowhere\.json: tokenizer file not found",
    ),
    # Resuming a workdir written with another config: refused, the differing key named.
    case(
        "resume-another-seed",
        _resume(_dual(seed=1)),
        r"workdir .* was written with a different config \(config\.seed: 0 -> 1\)",
        existing=True,
    ),
    case(
        "resume-another-lora-rank",
        _resume(GOOD, "--config.lora.rank=3"),
        r"different config \(config\.lora\.rank: 2 -> 3\); use a new --workdir",
        existing=True,
    ),
    case(
        "resume-another-task-count",
        _resume(_dual(stream=_stream(3))),
        r"different config \(config\.stream: 2 entries \['a', 'b'\] -> "
        r"3 entries \['a', 'b', 'c'\]\)",
        existing=True,
    ),
    case(
        "resume-another-model",
        _resume(GOOD, "--config.model.width=64"),
        r"different config \(config\.model\.width: 32 -> 64\)",
        existing=True,
    ),
    case(
        "resume-config-json-corrupt",
        _after(lambda work: _write(work / "config.json", "{"), _resume(GOOD)),
        r"workdir: cannot read .*config\.json",
        existing=True,
    ),
    # inspect: what it reads is named. (A damaged checkpoint under ``run`` is reported alike,
    # but only at its restore, after the backbone and the zero-shot evaluation are compiled:
    # some 20 s, so it is checked through inspect only.)
    case(
        "inspect-unknown-method",
        _inspect("--method", "icarl"),
        r"unknown method 'icarl'",
        existing=True,
    ),
    case(
        "inspect-method-not-run",
        _inspect("--method", "mslora"),
        r"no checkpoints for method 'mslora' under .*checkpoints/mslora",
        existing=True,
    ),
    case(
        "inspect-task-out-of-range",
        _inspect("--method", "seq", "--task", "9"),
        r"task id 9 is out of range: the stream has 2",
        existing=True,
    ),
    case(
        "inspect-unknown-task",
        _inspect("--method", "seq", "--task", "derm"),
        r"unknown task name 'derm'; the stream has \['a', 'b'\]",
        existing=True,
    ),
    case(
        "inspect-corrupt-checkpoint",
        _inspect("--method", "seq", change=_corrupt_adapter),
        r"checkpoint .*checkpoints/seq/0 is unreadable",
        existing=True,
    ),
    case("inspect-no-method", _inspect(), r"inspect needs --method", existing=True),
    case(
        "inspect-not-a-workdir",
        _inspect("--method", "seq"),
        r"workdir: cannot read .*work/config\.json",
    ),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_clear_line_and_leaves_the_workdir(bad: Case, tmp_path, request):
    work = None
    if bad.existing:
        work = tmp_path / "work"
        shutil.copytree(request.getfixturevalue("good_run"), work)  # copy2 keeps the mtimes
    args = bad.build(tmp_path, work)
    before = _snapshot(work) if work else None
    outcome = _cli(*args)
    stderr = outcome.stderr
    assert "Traceback" not in stderr, stderr
    if bad.strict:
        assert outcome.code == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert re.search(bad.message, lines[0]), (bad.message, lines[0])
    else:
        assert outcome.code != 0, stderr
        assert re.search(bad.message, stderr), (bad.message, stderr)
    if work is None:  # nothing created, so nothing half-written (no config.json claiming it)
        assert not (tmp_path / "work").exists(), sorted((tmp_path / "work").rglob("*"))
    else:
        assert _snapshot(work) == before


def test_docs_state_the_number_of_cases():
    text = (ROOT / "docs" / "command_line.md").read_text()
    (count,) = re.findall(r"`tests/test_bad_input\.py`\s+runs\s+(\d+)", text)
    assert int(count) == len(CASES)
