"""PersimmonTokenizer over a real sentencepiece model trained on real prose."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
import torch

from persimmon import PersimmonTokenizer
from jobs.corpus import paragraphs

ZOO = {
    "empty": "",
    "space": " ",
    "whitespace": " \t \n\n  \r\n ",
    "leading-trailing": "  padded text  ",
    "emoji": "ship it 🚀🍑 now 👩‍👩‍👧",
    "cjk": "柿子是一种水果。日本語のテキスト、한국어",
    "nul": "before\x00after",
    "control": "bell\x07 esc\x1b[31m del\x7f form\x0c",
    "combining": "e\u0301 cafe\u0301 \ufb01 \u2163",
    "rtl": "مرحبا بالعالم שלום",
    "long": ("All work and no play makes Jack a dull boy. " * 2400)[:100_000],
}


@pytest.fixture(scope="module")
def tok(sentencepiece_model):
    return PersimmonTokenizer(sentencepiece_model)


def test_ids_equal_sentencepiece_for_real_text(tok, sentencepiece_model):
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    for text in paragraphs()[:300:7]:
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert tok.encode(text) == [tok.bos_token_id, *sp.encode(text)]


@pytest.mark.parametrize("name", ZOO)
def test_round_trip_bad_input_zoo(tok, name):
    text = ZOO[name]
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_from_vocabulary_and_config(tok, sentencepiece_model, tmp_path):
    end = tok.sp.piece_to_id("|ENDOFTEXT|")
    assert tok.bos_token_id == tok.eos_token_id == end and tok.pad_token_id is None
    # Adept's file name, and the model's config.json beside it decides the ids
    shutil.copyfile(sentencepiece_model, tmp_path / "adept_vocab.model")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    other = PersimmonTokenizer.from_pretrained(tmp_path)
    assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (1, 2, 0)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        PersimmonTokenizer.from_pretrained(tmp_path / "missing")


def test_decode_skips_or_shows_specials(tok):
    ids = tok.encode("hello world") + [tok.eos_token_id]
    assert tok.decode(ids) == "hello world"
    shown = tok.decode(ids, skip_special_tokens=False)
    assert shown.startswith("|ENDOFTEXT|") and shown.endswith("|ENDOFTEXT|") and "hello world" in shown


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tok, side):
    texts = ["a short one", "a considerably longer text than the first one, with more words", "mid length text"]
    ids, mask = tok.batch(texts, padding_side=side)
    assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long
    for i, text in enumerate(texts):
        row = ids[i][mask[i].bool()].tolist()
        assert row == tok.encode(text)
        real = mask[i].nonzero().flatten()
        if side == "left":
            assert real[-1] == ids.shape[1] - 1
        else:
            assert real[0] == 0
    # no pad id in the model: pads are a harmless id, the mask marks them
    assert (ids[~mask.bool()] == tok.eos_token_id).all()


def test_truncation_sides(tok):
    text = paragraphs()[3]
    full = tok.encode(text)
    right = tok.encode_truncated(text, max_length=10, truncation_side="right")
    left = tok.encode_truncated(text, max_length=10, truncation_side="left")
    assert right.truncated and right.ids == full[:10]
    assert left.truncated and left.ids == [tok.bos_token_id] + full[-9:]
    assert not tok.encode_truncated("hi", max_length=10).truncated
    ids, mask = tok.batch([text, "hi"], max_length=10, truncation_side="left")
    assert ids.shape == (2, 10) and ids[0].tolist() == left.ids
    with pytest.raises(ValueError, match="truncation_side must be"):
        tok.batch(["x"], max_length=1, truncation_side="middle")


def test_chat_prompt_single_and_multi_turn():
    assert PersimmonTokenizer.chat_prompt("What is a persimmon?") == "human: What is a persimmon?\n\nadept:"
    assert PersimmonTokenizer.chat_prompt("And its color?", [("What is a persimmon?", "A fruit.")]) == (
        "human: What is a persimmon?\n\nadept: A fruit.\n\nhuman: And its color?\n\nadept:"
    )


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="encode takes a str, got NoneType"):
        tok.encode(None)
