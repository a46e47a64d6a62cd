"""Conversation templates and a Mistral-style tokenizer (no <image>, no <pad>) end to end."""

import dataclasses

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mslora_jax.config import experiment_config
from mslora_jax.data.chat_template import ChatTemplate
from mslora_jax.data.conversation import (
    check_tokenizer_fits,
    encode_conversation,
    encode_prompt,
    render_conversation,
    save_tokenizer,
    special_ids,
)
from mslora_jax.data.vqa import VqaExample
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.families.llava.experiment import GenerativeExperiment, load_vqa_task
from mslora_jax.families.llava.setup import obtain_tokenizer
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import init_llava
from mslora_jax.models.pixels import normalize_images
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import run_method
from tests.test_generative import _tiny_llava_config, _write_tasks

TURNS = (("<image>\nIs this a CT scan?", "yes"), ("Which organ?", "the left lung"))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_mistral_instruct_text_is_llavas_llama2_style():
    rendered = ChatTemplate("mistral_instruct").render(TURNS)
    # LLaVA's conv_mistral_instruct: sep "", sep2 "</s>", no system line.
    assert rendered.text == (
        "[INST] <image>\nIs this a CT scan? [/INST] yes </s>"
        "[INST] Which organ? [/INST] the left lung </s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.targets] == [" yes </s>", " the left lung </s>"]
    prompt = ChatTemplate("mistral_instruct").render_prompt("<image>\nIs this a CT scan?")
    assert prompt == "[INST] <image>\nIs this a CT scan? [/INST]"
    with_system = ChatTemplate("mistral_instruct", system="Be brief.").render_prompt("Q?")
    assert with_system == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ? [/INST]"


def test_vicuna_v1_text_and_targets():
    rendered = ChatTemplate("vicuna_v1", system="Sys.").render(TURNS)
    assert rendered.text == (
        "Sys. USER: <image>\nIs this a CT scan? ASSISTANT: yes</s>"
        "USER: Which organ? ASSISTANT: the left lung</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.targets] == [" yes</s>", " the left lung</s>"]
    assert ChatTemplate().render_prompt("Q?") == f"{ChatTemplate().system_text} USER: Q? ASSISTANT:"
    with pytest.raises(ConfigError, match="llava.template='chatml'"):
        ChatTemplate("chatml")


def _metaspace_tokenizer(template: ChatTemplate, texts=()) -> Tokenizer:
    """A LLaMA/Mistral-like tokenizer: Metaspace pre-tokenizer, only <unk> <s> </s> special."""
    corpus = [render_conversation(VqaExample("0", "", TURNS), template), *texts] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def test_tokenizer_without_image_and_pad_tokens():
    template = ChatTemplate("mistral_instruct")
    tokenizer = _metaspace_tokenizer(template)
    ids = special_ids(tokenizer, image_token_id=-200)
    assert ids.image == -200 and ids.pad == ids.unk == tokenizer.token_to_id("<unk>")
    with pytest.raises(DataError, match="no '<image>' token"):
        special_ids(tokenizer)
    check_tokenizer_fits(tokenizer, vocab_size=256, image_token_id=-200)
    with pytest.raises(ConfigError, match="LLaVA's -200"):
        check_tokenizer_fits(tokenizer, vocab_size=256, image_token_id=5)

    enc = encode_conversation(tokenizer, VqaExample("0", "", TURNS), 128, template, -200)
    input_ids, mask = enc["input_ids"], enc["loss_mask"]
    assert input_ids[0] == ids.bos and np.sum(input_ids == -200) == 1
    assert np.sum(input_ids == ids.eos) == 2 and np.all(mask[input_ids == ids.eos])
    # The targets are exactly the answers, their spaces and each </s>.
    targets = [tokenizer.id_to_token(int(i)) for i in input_ids[mask]]
    assert "".join(targets).replace("▁", " ") == " yes </s> the left lung </s>"
    prompt = encode_prompt(tokenizer, "Is this a CT scan?", template=template, image_token_id=-200)
    np.testing.assert_array_equal(input_ids[: len(prompt)], prompt)
    assert not mask[: len(prompt)].any() and mask[len(prompt)]


def test_text_with_special_tokens_is_rejected():
    template = ChatTemplate("mistral_instruct")
    tokenizer = _metaspace_tokenizer(template)
    bad = VqaExample("7", "", (("<image>\nIs it </s> fine?", "yes"),))
    with pytest.raises(DataError, match="conversation '7'.*</s>"):
        encode_conversation(tokenizer, bad, 128, template, -200)
    two_images = VqaExample("8", "", (("<image>\nIs it <image>?", "yes"),))
    with pytest.raises(DataError, match="exactly one <image>"):
        encode_conversation(tokenizer, two_images, 128, template, -200)


def test_image_normalization_with_clip_mean_and_std():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10
    got = np.asarray(normalize_images(images, CLIP_MEAN, CLIP_STD))
    want = (images / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(got, want, atol=1e-6)
    default = np.asarray(normalize_images(images))
    np.testing.assert_allclose(default, images / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize(
    "llava, match",
    [
        (dict(template="llama3"), "llava.template='llama3'"),
        (dict(image_mean=[0.5, 0.5, 0.5]), "set together"),
        (dict(image_mean=[0.5, 0.5], image_std=[0.5, 0.5]), "3 numbers"),
        (dict(image_mean=[0.5] * 3, image_std=[0.5, 0.0, 0.5]), "image_std must be > 0"),
    ],
)
def test_bad_llava_settings_are_named(llava, match):
    stream = [dict(name="t", modality="m", source="vqa")]
    with pytest.raises(ConfigError, match=match):
        experiment_config(dict(stream=stream, model_kind="llava", llava=llava))


def test_mistral_style_run_trains_and_answers(tmp_path):
    """The generative path with mistral_instruct, id -200, <unk> padding, CLIP norm, and
    gradient accumulation."""
    _write_tasks(tmp_path, [("s_p", "pathology", 11, 16), ("s_r", "radiology", 21, 16)], 8)
    config = _tiny_llava_config(
        tmp_path,
        stream=[("s_p", "pathology"), ("s_r", "radiology")],
        steps_per_task=2,
        grad_accum_steps=2,
    )
    llava = dataclasses.replace(
        config.llava,
        template="mistral_instruct",
        image_token_id=-200,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    tasks = [load_vqa_task(config, t) for t in config.stream]
    template = ChatTemplate("mistral_instruct")
    texts = [render_conversation(e, template) for t in tasks for e in t.examples]
    path = tmp_path / "mistral_like" / "tokenizer.json"
    save_tokenizer(_metaspace_tokenizer(template, texts), path)
    llava = dataclasses.replace(llava, tokenizer_file=str(path))
    config = dataclasses.replace(config, llava=llava)
    tokenizer = obtain_tokenizer(config, tasks, tmp_path / "work")
    params = init_llava(config.llava.model_config(), jax.random.PRNGKey(0))
    exp = GenerativeExperiment(
        config,
        tasks,
        tokenizer,
        make_mesh(1),
        params,
        select_targets(params, config.lora.targets),
        max_len=96,
        max_new_tokens=3,
    )
    outcome = run_method(exp, get_method("mslora"), None, {})
    assert np.all(np.isfinite(outcome.summary["acc_matrix"][1]))
    records = exp.answer_records({}, [], 0)
    assert len(records) == 8 and all(isinstance(r["answer"], str) for r in records)
