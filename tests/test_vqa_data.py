"""Tests for the generative VQA data: readers, template/tokenisation, padding and the batcher."""

import json

import numpy as np
import pytest
from PIL import Image

from mslora_jax.data.conversation import (
    SPECIAL_TOKENS,
    build_tokenizer,
    check_tokenizer_fits,
    encode_conversation,
    encode_conversations,
    encode_prompt,
    left_pad_prompts,
    load_tokenizer,
    pad_batch,
    render_conversation,
    save_tokenizer,
    special_ids,
)
from mslora_jax.data.vqa import (
    PAD_COLOR,
    VqaExample,
    load_image,
    read_test_file,
    read_train_file,
)
from mslora_jax.data.vqa_pipeline import (
    ImageCache,
    ImageRows,
    vqa_eval_batches,
    vqa_train_batches,
)
from mslora_jax.errors import ConfigError, DataError
from tests.helpers import assert_same_batches

MAX_LEN = 192
TRAIN = [
    {
        "id": 0,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat modality is this?"},
            {"from": "gpt", "value": "This is a chest X-ray."},
        ],
    },
    {
        "id": "b1",
        "image": "sub/b.png",
        "conversations": [
            {"from": "human", "value": "Which organ is shown?\n<image>"},
            {"from": "gpt", "value": "The lung, seen from the front."},
            {"from": "human", "value": "Is there an abnormality?"},
            {"from": "gpt", "value": "Yes, a small nodule."},
        ],
    },
    {
        "id": 2,
        "image": "c.png",
        "conversations": [
            {"from": "human", "value": "<image>\nIs this an MRI?"},
            {"from": "gpt", "value": "No."},
        ],
    },
]
TEST = [
    {"question_id": 7, "image": "a.png", "text": "Is this a CT?", "gt": "no",
     "answer_type": "CLOSED", "candidates": ["yes", "no"]},
    {"question_id": "q8", "image": "c.png", "text": "What organ?", "gt": "brain",
     "answer_type": "open"},
]  # fmt: skip


def _write_images(image_dir):
    (image_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(image_dir / "sub/b.png")
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8), mode="RGBA").save(image_dir / "c.png")


@pytest.fixture()
def data(tmp_path):
    """(train path, test path, image dir) of a tiny data set."""
    image_dir = tmp_path / "images"
    _write_images(image_dir)
    train = tmp_path / "train.json"
    train.write_text(json.dumps(TRAIN))
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in TEST) + "\n\n")
    return train, test, image_dir


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render_conversation(VqaExample(str(r["id"]), "", _turns(r))) for r in TRAIN]
    return build_tokenizer(texts * 5, vocab_size=320)


def _turns(record):
    values = [c["value"] for c in record["conversations"]]
    return tuple(zip(values[0::2], values[1::2]))


def _write_train(tmp_path, records):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


# --- readers ---------------------------------------------------------------------------------


def test_read_train_round_trip(data):
    train, _, image_dir = data
    examples = read_train_file(train, image_dir)
    assert [e.id for e in examples] == ["0", "b1", "2"]
    assert examples[1].image == str(image_dir / "sub/b.png")
    assert examples[1].turns == (
        ("Which organ is shown?\n<image>", "The lung, seen from the front."),
        ("Is there an abnormality?", "Yes, a small nodule."),
    )
    assert examples[0].turns == (("<image>\nWhat modality is this?", "This is a chest X-ray."),)


def test_read_test_round_trip(data):
    _, test, image_dir = data
    items = read_test_file(test, image_dir)
    assert [(i.question_id, i.question, i.gt, i.answer_type) for i in items] == [
        ("7", "Is this a CT?", "no", "CLOSED"),
        ("q8", "What organ?", "brain", "OPEN"),
    ]
    assert items[0].candidates == ("yes", "no") and items[1].candidates == ()
    assert items[1].image == str(image_dir / "c.png")


def test_missing_image_names_path_and_record(data, tmp_path):
    _, _, image_dir = data
    records = [dict(TRAIN[0]), dict(TRAIN[1], image="sub/missing.png")]
    with pytest.raises(DataError, match=r"bad\.json: record 1 \(id 'b1'\).*sub/missing\.png"):
        read_train_file(_write_train(tmp_path, records), image_dir)
    assert len(read_train_file(_write_train(tmp_path, records), image_dir, check_images=False)) == 2
    test = tmp_path / "t.jsonl"
    test.write_text(json.dumps(dict(TEST[0], image="nope.png")))
    with pytest.raises(DataError, match=r"t\.jsonl: line 1 \(question_id '7'\).*nope\.png"):
        read_test_file(test, image_dir)


def test_malformed_jsonl_line_names_file_and_line(data, tmp_path):
    _, _, image_dir = data
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(TEST[0]) + "\n\n" + '{"question_id": 9, "image"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3: malformed JSON"):
        read_test_file(path, image_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer_type": "YESNO"}, r"line 1 .*answer_type must be OPEN or CLOSED"),
        ({"gt": None}, r"line 1 .*'gt' must be a string or integer"),
        ({"candidates": "yes"}, r"'candidates' must be a list of strings"),
        ({"text": "<image> <image> q"}, r"<image> more than once"),
    ],
)
def test_bad_test_records(data, tmp_path, change, message):
    _, _, image_dir = data
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(dict(TEST[0], **change)))
    with pytest.raises(DataError, match=message):
        read_test_file(path, image_dir)


def test_bad_test_file_level_errors(data, tmp_path):
    _, _, image_dir = data
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(TEST[0]) + "\n" + json.dumps(TEST[0]))
    with pytest.raises(DataError, match=r"line 2: question_id '7' already used on line 1"):
        read_test_file(path, image_dir)
    record = {k: v for k, v in TEST[0].items() if k != "gt"}
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"t\.jsonl: line 1: missing key 'gt'"):
        read_test_file(path, image_dir)
    with pytest.raises(DataError, match=r"nothing\.jsonl: file not found"):
        read_test_file(tmp_path / "nothing.jsonl", image_dir)


def _conversation(*pairs):
    return [{"from": who, "value": value} for who, value in pairs]


@pytest.mark.parametrize(
    "conversations, message",
    [
        (
            _conversation(("gpt", "<image>\nhi"), ("human", "a")),
            r"record 0 \(id 'x'\): conversations\[0\]: expected 'from' 'human'",
        ),
        (
            _conversation(("human", "<image>\nq"), ("human", "a")),
            r"conversations\[1\]: expected 'from' 'gpt'",
        ),
        (_conversation(("human", "<image>\nq")), r"the last human turn has no gpt answer"),
        (_conversation(("human", "q"), ("gpt", "a")), r"<image> exactly once, found 0"),
        (_conversation(("human", "<image><image>q"), ("gpt", "a")), r"exactly once, found 2"),
        (
            _conversation(("human", "<image>q"), ("gpt", "a"), ("human", "<image>"), ("gpt", "b")),
            r"conversations\[2\] holds <image>",
        ),
        ([{"from": "human"}], r"conversations\[0\]: missing key 'value'"),
        ([], r"'conversations' must be a non-empty list"),
    ],
)
def test_bad_conversations(data, tmp_path, conversations, message):
    _, _, image_dir = data
    path = _write_train(tmp_path, [{"id": "x", "image": "a.png", "conversations": conversations}])
    with pytest.raises(DataError, match=message):
        read_train_file(path, image_dir)


def test_bad_train_files(data, tmp_path):
    _, _, image_dir = data
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1,\n "image": }]')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 2"):
        read_train_file(path, image_dir)
    with pytest.raises(DataError, match=r"expected a JSON list"):
        read_train_file(_write_train(tmp_path, {"id": 1}), image_dir)
    with pytest.raises(DataError, match=r"record 1: missing key 'conversations'"):
        read_train_file(_write_train(tmp_path, [TRAIN[0], {"id": 1, "image": "a"}]), image_dir)
    with pytest.raises(DataError, match=r"nothing\.json: file not found"):
        read_train_file(tmp_path / "nothing.json", image_dir)


def test_load_image(data, tmp_path):
    _, _, image_dir = data
    for name in ("a.png", "sub/b.png", "c.png"):
        image = load_image(image_dir / name, 12)
        assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(load_image(image_dir / "c.png", 5), 200)  # alpha dropped
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((4, 4), 128 * 257, np.uint16)).save(wide)
    np.testing.assert_array_equal(load_image(wide, 4), 128)  # 16-bit range mapped, not clipped
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png: cannot read image"):
        load_image(junk, 8)
    with pytest.raises(DataError, match=r"gone\.png: image file not found"):
        load_image(tmp_path / "gone.png", 8)


def test_load_image_pad_to_square_keeps_the_aspect_ratio(tmp_path):
    # A white 8x4 (w x h) image: padded, it fills the middle half of the rows of a square;
    # squashed, it fills the whole square.
    path = tmp_path / "landscape.png"
    Image.fromarray(np.full((4, 8, 3), 255, np.uint8)).save(path)
    np.testing.assert_array_equal(load_image(path, 8), 255)
    padded = load_image(path, 8, pad_to_square=True)
    np.testing.assert_array_equal(padded[2:6], 255)
    np.testing.assert_array_equal(padded[:2], np.broadcast_to(PAD_COLOR, (2, 8, 3)))
    np.testing.assert_array_equal(padded[6:], np.broadcast_to(PAD_COLOR, (2, 8, 3)))
    square = tmp_path / "square.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(square)
    np.testing.assert_array_equal(load_image(square, 4, True), load_image(square, 4))


# --- tokenizer and template ------------------------------------------------------------------


def test_tokenizer_special_ids_and_round_trip(tokenizer, tmp_path):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    path = tmp_path / "tok" / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    text = "USER: <image>\nIs the lung clear? ASSISTANT: yes, überall"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a valid tokenizer\.json"):
        load_tokenizer(bad)
    with pytest.raises(ConfigError, match="vocab_size must be >= 261"):
        build_tokenizer(["a"], vocab_size=100)
    with pytest.raises(ConfigError, match="must start with"):
        build_tokenizer(["a"], vocab_size=300, special_tokens=("<s>", "<pad>"))


def test_tokenizer_must_fit_the_model(tokenizer):
    size = tokenizer.get_vocab_size()
    check_tokenizer_fits(tokenizer, vocab_size=size, image_token_id=special_ids(tokenizer).image)
    with pytest.raises(ConfigError, match=f"has {size} tokens but llava.decoder.vocab_size"):
        check_tokenizer_fits(tokenizer, vocab_size=size - 1, image_token_id=4)
    with pytest.raises(ConfigError, match="set llava.image_token_id=4"):
        check_tokenizer_fits(tokenizer, vocab_size=size, image_token_id=7)


def _examples(data):
    train, _, image_dir = data
    return read_train_file(train, image_dir)


def test_loss_mask_covers_exactly_the_answers(data, tokenizer):
    ids = special_ids(tokenizer)
    for example in _examples(data):
        enc = encode_conversation(tokenizer, example, max_len=512)
        input_ids, mask = enc["input_ids"], enc["loss_mask"]
        assert input_ids.dtype == np.int32 and mask.dtype == bool
        assert input_ids[0] == ids.bos and np.sum(input_ids == ids.image) == 1
        # Same ids as encoding the rendered template string in one go.
        whole = tokenizer.encode(render_conversation(example), add_special_tokens=False).ids
        assert input_ids.tolist() == [ids.bos, *whole]
        # Masked runs are exactly " {answer}</s>", in order; everything else is prompt.
        edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
        runs = [input_ids[a:b] for a, b in zip(edges[0::2], edges[1::2])]
        assert len(runs) == len(example.turns)
        for run, (_, answer) in zip(runs, example.turns):
            assert run[-1] == ids.eos and ids.eos not in run[:-1]
            assert tokenizer.decode(run[:-1].tolist()).strip() == answer
        prompt = tokenizer.decode(input_ids[~mask].tolist(), skip_special_tokens=False)
        for question, answer in example.turns:
            assert question in prompt and answer not in prompt


def test_truncation(data, tokenizer):
    example = _examples(data)[1]
    full = encode_conversation(tokenizer, example, max_len=512)
    first = int(np.argmax(full["loss_mask"]))
    cut = encode_conversation(tokenizer, example, max_len=first + 1)
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][: first + 1])
    assert cut["loss_mask"].sum() == 1 and cut["loss_mask"][-1]
    with pytest.raises(DataError, match=r"conversation 'b1': the first answer starts at token"):
        encode_conversation(tokenizer, example, max_len=first)


def test_encode_rejects_stray_special_tokens(tokenizer):
    example = VqaExample("z", "x.png", (("<image> q", "a </s> b"),))
    with pytest.raises(DataError, match=r"conversation 'z': the text contains the special token"):
        encode_conversation(tokenizer, example, max_len=64)
    example = VqaExample("z", "x.png", (("q", "a"), ("<image>", "b")))
    with pytest.raises(DataError, match=r"must be in the first question"):
        encode_conversation(tokenizer, example, max_len=64)


def test_encode_prompt_matches_training_prefix(data, tokenizer):
    ids = special_ids(tokenizer)
    example = _examples(data)[0]
    question, answer = example.turns[0]
    train = encode_conversation(tokenizer, example, max_len=512)
    prompt = encode_prompt(tokenizer, question)
    first = int(np.argmax(train["loss_mask"]))
    np.testing.assert_array_equal(prompt, train["input_ids"][:first])
    assert tokenizer.decode(prompt.tolist()).endswith("ASSISTANT:")
    # A test question without <image> gets one in front.
    bare = encode_prompt(tokenizer, "What modality is this?")
    np.testing.assert_array_equal(bare, prompt)
    assert np.sum(bare == ids.image) == 1
    with pytest.raises(DataError, match="over max_len 5"):
        encode_prompt(tokenizer, "What modality is this?", max_len=5)


def test_pad_batch_and_left_pad(data, tokenizer):
    encs = [encode_conversation(tokenizer, e, max_len=512) for e in _examples(data)]
    lengths = [len(e["input_ids"]) for e in encs]
    length = max(lengths) + 3
    batch = pad_batch(encs, pad_id=0, length=length)
    assert set(batch) == {"input_ids", "loss_mask", "attention_mask"}
    for row, (enc, n) in enumerate(zip(encs, lengths)):
        np.testing.assert_array_equal(batch["input_ids"][row, :n], enc["input_ids"])
        np.testing.assert_array_equal(batch["loss_mask"][row, :n], enc["loss_mask"])
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (length - n)
        assert not batch["loss_mask"][row, n:].any() and (batch["input_ids"][row, n:] == 0).all()
    with pytest.raises(ConfigError, match="over length"):
        pad_batch(encs, pad_id=0, length=min(lengths) - 1)

    prompts = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    left = left_pad_prompts(prompts, pad_id=0, length=4)
    np.testing.assert_array_equal(left["input_ids"], [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(left["positions"], [[0, 0, 1, 2], [0, 0, 0, 0]])
    assert left_pad_prompts(prompts, pad_id=0)["input_ids"].shape == (2, 3)


# --- training batches ------------------------------------------------------------------------


def _batches(examples, tokenizer, **kwargs):
    options = dict(image_size=8, max_len=MAX_LEN, batch_size=2, num_steps=5, seed=3)
    return list(vqa_train_batches(examples, tokenizer, **{**options, **kwargs}))


def test_pipeline_shapes_and_determinism(data, tokenizer):
    examples = _examples(data)
    first = _batches(examples, tokenizer)
    assert len(first) == 5
    for batch in first:
        assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.uint8
        for key, dtype in (("input_ids", np.int32), ("loss_mask", bool), ("attention_mask", bool)):
            assert batch[key].shape == (2, MAX_LEN) and batch[key].dtype == dtype
        assert (np.sum(batch["input_ids"] == 4, axis=1) == 1).all()
    again = _batches(examples, tokenizer, image_cache_mb=0, num_threads=1)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Resuming at a step gives the same tail; another seed gives another order.
    resumed = _batches(examples, tokenizer, start_step=3)
    np.testing.assert_array_equal(resumed[0]["input_ids"], first[3]["input_ids"])
    other = _batches(examples, tokenizer, seed=4)
    assert any((a["input_ids"] != b["input_ids"]).any() for a, b in zip(first, other))


@pytest.mark.parametrize("pad_to_square", [False, True])  # a.png is 24 x 20, not square
def test_pipeline_rows_pair_images_with_text(data, tokenizer, pad_to_square):
    examples = _examples(data)
    by_ids = {
        tuple(encode_conversation(tokenizer, e, MAX_LEN)["input_ids"]): load_image(
            e.image, 8, pad_to_square
        )
        for e in examples
    }
    batches = _batches(examples, tokenizer, batch_size=1, num_steps=6, pad_to_square=pad_to_square)
    for batch in batches:
        ids = batch["input_ids"][0][batch["attention_mask"][0]]
        np.testing.assert_array_equal(batch["image"][0], by_ids[tuple(ids)])


def test_pipeline_process_rows_and_errors(data, tokenizer):
    examples = _examples(data) * 2
    full = _batches(examples, tokenizer, batch_size=2)
    # Two processes' rows of each global batch put back together give the one-process batch.
    parts = [_batches(examples, tokenizer, batch_size=2, rows=(i, i + 1)) for i in (0, 1)]
    assert all(b["input_ids"].shape == (1, MAX_LEN) for part in parts for b in part)
    for step, batch in enumerate(full):
        for key, value in batch.items():
            np.testing.assert_array_equal(
                np.concatenate([part[step][key] for part in parts]), value
            )
    with pytest.raises(ConfigError, match="rows"):
        vqa_train_batches(
            examples, tokenizer, image_size=8, max_len=MAX_LEN, batch_size=3, num_steps=1, seed=0,
            rows=(2, 4),
        )  # fmt: skip
    with pytest.raises(DataError, match="first answer starts at token"):
        vqa_train_batches(
            examples, tokenizer, image_size=8, max_len=10, batch_size=2, num_steps=1, seed=0
        )


def _reference_train(examples, tokenizer, *, batch_size, num_steps, seed, rows, start_step):
    """The batches as the pipeline built them before it read ahead (41b7a3e), written out:
    each epoch a seeded permutation cut into batches; this process's rows; images decoded."""
    text = pad_batch(encode_conversations(tokenizer, examples, MAX_LEN), 0, MAX_LEN)
    n, (start, stop) = len(examples), rows
    out = []
    for step in range(start_step, num_steps):
        epoch, position = divmod(step, n // batch_size)
        order = np.random.default_rng([seed, 1, epoch]).permutation(n)
        ids = order[position * batch_size : (position + 1) * batch_size][start:stop]
        image = np.stack([load_image(examples[i].image, 8) for i in ids])
        out.append({"image": image, **{key: value[ids] for key, value in text.items()}})
    return out


@pytest.mark.parametrize(
    "seed, start_step, rows, cache_mb, prefetch",
    [(3, 0, (0, 3), 1024, 2), (5, 4, (1, 3), 0, 0), (8, 7, (2, 3), 1, 3)],
)
def test_pipeline_equals_the_old_formula(
    data, tokenizer, seed, start_step, rows, cache_mb, prefetch
):
    examples = _examples(data) * 3  # 9 examples, 3 images: shared images come from the cache
    options = dict(batch_size=3, num_steps=10, seed=seed, rows=rows, start_step=start_step)
    assert_same_batches(
        _batches(examples, tokenizer, image_cache_mb=cache_mb, prefetch=prefetch, **options),
        _reference_train(examples, tokenizer, **options),
    )


def test_pipeline_decodes_in_a_worker_process(data, tokenizer):
    # One spawned worker builds every batch (decoding its images, with its own cache); seconds:
    # it imports jax through grain. The ordering of several workers: test_data_pipeline.py.
    examples = _examples(data) * 2
    options = dict(batch_size=2, num_steps=6, seed=1, rows=(0, 2), start_step=1)
    assert_same_batches(
        _batches(examples, tokenizer, num_workers=1, **options),
        _reference_train(examples, tokenizer, **options),
    )


def test_image_cache_is_lru_by_bytes():
    cache = ImageCache(max_bytes=300)
    a, b, c = (np.full(100, i, np.uint8) for i in range(3))
    cache.put("a", a)
    cache.put("b", b)
    cache.put("c", c)
    assert cache.nbytes == 300 and len(cache) == 3
    assert cache.get("a") is a  # now the most recently used
    cache.put("d", np.zeros(150, np.uint8))  # evicts b and c, the least recently used
    assert "b" not in cache and "c" not in cache and "a" in cache and cache.nbytes == 250
    assert cache.get("b") is None
    cache.put("a", np.zeros(50, np.uint8))  # replacing an entry counts its new size only
    assert cache.nbytes == 200
    cache.put("huge", np.zeros(301, np.uint8))  # larger than the bound: not kept, nothing evicted
    assert "huge" not in cache and cache.nbytes == 200
    off = ImageCache(0)
    off.put("a", a)
    assert len(off) == 0 and off.nbytes == 0
    with pytest.raises(ConfigError, match="max_bytes"):
        ImageCache(-1)


def test_image_rows_stay_within_the_cache_bound(data, monkeypatch):
    import mslora_jax.data.vqa_pipeline as vqa_pipeline

    decoded = []

    def counting_load(path, image_size, pad_to_square=False):
        decoded.append(path)
        return load_image(path, image_size, pad_to_square)

    monkeypatch.setattr(vqa_pipeline, "load_image", counting_load)
    paths = [e.image for e in _examples(data)]  # 3 images of 8 * 8 * 3 = 192 bytes
    expected = [load_image(p, 8) for p in paths]
    order = [[0, 1], [1, 2], [0, 0], [2, 1], [0, 2]]
    for cache_bytes, decodes in ((0, 9), (192 * 2, 6), (192 * 3, 3)):
        rows = ImageRows(paths, image_size=8, cache_bytes=cache_bytes, num_threads=2)
        decoded.clear()
        for step in order:
            np.testing.assert_array_equal(rows(step), np.stack([expected[i] for i in step]))
            assert rows.cache.nbytes <= cache_bytes
        # No cache: each distinct image of a batch once (9). Room for two: the misses of a
        # least-recently-used cache, 0 1 | 2 (evicts 0) | 0 (evicts 1) | 1 | 0 (6). All three:
        # each image once (3).
        assert len(decoded) == decodes, (cache_bytes, decoded)


def _reference_eval(paths, prompts, batch_size, rows):
    """The generative eval batches as GenerativeExperiment.answers built them (41b7a3e)."""
    length, (start, stop) = max(len(p) for p in prompts), rows
    out = []
    for first in range(0, len(paths), batch_size):
        chunk = list(range(first, min(first + batch_size, len(paths))))
        items = chunk + [chunk[-1]] * (batch_size - len(chunk))
        padded = left_pad_prompts([prompts[i] for i in items], 0, length)
        image = np.stack([load_image(paths[i], 8, True) for i in items])
        out.append({k: v[start:stop] for k, v in {"image": image, **padded}.items()})
    return out


@pytest.mark.parametrize(
    "batch_size, rows, prefetch", [(2, (0, 2), 2), (4, (1, 3), 0), (5, (4, 5), 1)]
)
def test_eval_batches_equal_the_old_loop(data, tokenizer, batch_size, rows, prefetch):
    paths = [e.image for e in _examples(data)] * 2  # 6 items: the last batch is filled up
    questions = ["Is this a CT?", "What organ?", "Which side?"] * 2
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    batches = vqa_eval_batches(
        paths, prompts, batch_size=batch_size, image_size=8, pad_id=0, rows=rows,
        pad_to_square=True, prefetch=prefetch,
    )  # fmt: skip
    assert_same_batches(batches, _reference_eval(paths, prompts, batch_size, rows))


def test_pipeline_option_errors(data, tokenizer):
    examples = _examples(data)
    for options, message in (
        ({"image_cache_mb": -1}, "image_cache_mb must be an integer >= 0"),
        ({"prefetch": -1}, "vqa_train_batches: prefetch"),
        ({"num_workers": "2"}, "vqa_train_batches: num_workers"),
        ({"num_threads": 0}, "num_threads"),
    ):
        with pytest.raises(ConfigError, match=message):
            _batches(examples, tokenizer, **options)
    prompts = [encode_prompt(tokenizer, "Is this a CT?")]
    paths = [examples[0].image]
    with pytest.raises(ConfigError, match="one prompt per image"):
        vqa_eval_batches(paths * 2, prompts, batch_size=2, image_size=8, pad_id=0)
    with pytest.raises(ConfigError, match="vqa_eval_batches: rows"):
        vqa_eval_batches(paths, prompts, batch_size=2, image_size=8, pad_id=0, rows=(1, 3))
