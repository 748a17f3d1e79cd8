"""ClassificationPipeline against transformers run one row at a time, on real text; bad input keeps its rows."""

from __future__ import annotations


import pyarrow as pa
import pytest
import torch

from persimmon import PersimmonTokenizer
from pipelines import ClassificationPipeline
from tests.conftest import build_hf_model
from jobs.corpus import paragraphs

MAX_POS = 64
LABELS = {0: "billing", 1: "bug", 2: "praise"}


def texts_of_mixed_length(tok: PersimmonTokenizer, count: int = 40) -> list[str]:
    """Real prose from one token to well past the model's window."""
    single = next(w for w in ("The", "the", "a", "of") if len(tok.encode(w, add_bos=False)) == 1)
    texts = [single]
    for i, p in enumerate(paragraphs()[200 : 200 + count - 1]):
        texts.append(p if i % 3 == 0 else p[: 20 + 37 * i % 300])
    assert any(len(tok.encode(t)) > MAX_POS for t in texts)
    return texts


def checkpoint(root, sentencepiece_model, kind="seqcls", **config):
    return build_hf_model(root, kind, tokenizer=sentencepiece_model, max_position_embeddings=MAX_POS, **config)


def reference_logits(hf, tok, text, max_length=MAX_POS, side="right"):
    ids = tok.encode_truncated(text, max_length, side).ids
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("padding_side,pad_id", [("right", None), ("left", None), ("right", 0)])
def test_single_label_equals_reference_row_by_row(tmp_path, sentencepiece_model, padding_side, pad_id):
    hf = checkpoint(tmp_path, sentencepiece_model, num_labels=3, id2label=LABELS, pad_token_id=pad_id)
    pipe = ClassificationPipeline(tmp_path, dtype="float32", padding_side=padding_side, batch_tokens=400)
    texts = texts_of_mixed_length(pipe.tokenizer)
    out = pipe(pa.table({"id": list(range(len(texts))), "text": texts}))
    assert out.column("id").to_pylist() == list(range(len(texts)))  # input order and columns kept
    assert out.column("text").to_pylist() == texts
    assert out.schema.field("probs").type == pa.list_(pa.float32()) and out.schema.field("score").type == pa.float32()
    for i, text in enumerate(texts):
        probs = torch.softmax(reference_logits(hf, pipe.tokenizer, text), -1)
        got = torch.tensor(out.column("probs")[i].as_py())
        torch.testing.assert_close(got, probs, atol=1e-4, rtol=0)
        assert out.column("label")[i].as_py() == LABELS[int(probs.argmax())]
        assert abs(out.column("score")[i].as_py() - float(probs.max())) < 1e-4
        assert out.column("error")[i].as_py() is None
    stats = pipe.stats.as_dict()
    assert stats["rows"] == len(texts) and stats["errors"] == 0 and stats["truncated"] > 0
    assert stats["padding_waste"] >= 1.0 and stats["batches"] > 1


def test_multi_label_and_regression(tmp_path, sentencepiece_model):
    texts = [p[:200] for p in paragraphs()[300:310]]
    hf = checkpoint(tmp_path / "multi", sentencepiece_model, num_labels=3, id2label=LABELS,
                    problem_type="multi_label_classification")
    pipe = ClassificationPipeline(tmp_path / "multi", dtype="float32", threshold=0.5)
    out = pipe(pa.table({"text": texts}))
    assert set(out.schema.names) == {"text", "labels", "probs", "error"}
    for i, text in enumerate(texts):
        probs = torch.sigmoid(reference_logits(hf, pipe.tokenizer, text))
        torch.testing.assert_close(torch.tensor(out.column("probs")[i].as_py()), probs, atol=1e-4, rtol=0)
        assert out.column("labels")[i].as_py() == [LABELS[j] for j in range(3) if probs[j] > 0.5]

    hf = checkpoint(tmp_path / "reg", sentencepiece_model, num_labels=1)
    pipe = ClassificationPipeline(tmp_path / "reg", dtype="float32")
    out = pipe(pa.table({"text": texts}))
    assert set(out.schema.names) == {"text", "score", "error"}
    for i, text in enumerate(texts):
        assert abs(out.column("score")[i].as_py() - float(reference_logits(hf, pipe.tokenizer, text)[0])) < 1e-4


@pytest.mark.parametrize("template", ["{text}\nTopic:", "Of {labels}: {text}\nTopic:"],
                         ids=["no-prefix", "shared-prefix"])
def test_zero_shot_equals_full_sequence_likelihood(tmp_path, sentencepiece_model, template):
    hf = checkpoint(tmp_path, sentencepiece_model, kind="causal")
    labels = ["billing question", "bug", "praise for the team"]  # multi-token candidates of different lengths
    pipe = ClassificationPipeline(tmp_path, dtype="float32", candidate_labels=labels, batch_tokens=300,
                                  prompt_template=template)
    texts = [p[: 30 + 41 * i % 200] for i, p in enumerate(paragraphs()[400:412])]
    out = pipe(pa.table({"text": texts}))
    tok = pipe.tokenizer
    label_ids = [tok.encode_continuation(l) for l in labels]
    assert max(len(l) for l in label_ids) > 1
    for i, text in enumerate(texts):
        prompt = pipe.template.encode(tok, text, pipe.max_length, "right")[0]
        scores = []
        for ids in label_ids:  # the naive way: one full forward per (row, label)
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logp = torch.log_softmax(hf(full).logits[0].float(), -1)
            scores.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ids)))
        probs = torch.softmax(torch.stack(scores), -1)
        torch.testing.assert_close(torch.tensor(out.column("probs")[i].as_py()), probs, atol=1e-4, rtol=0)
        assert out.column("label")[i].as_py() == labels[int(probs.argmax())]
    # with a template text before {text}, that text was prefilled once and shared by the rows
    assert (pipe.prefix_cache is not None) == template.startswith("Of")


ZOO = [
    ("null", None, "text is null"),
    ("empty", "", "text is empty"),
    ("whitespace", " \t\n ", "text is only whitespace"),
    ("nul", "a\x00b", None),
    ("emoji", "🙂🍑 ok", None),
    ("control", "\x1b[31mred\x07", None),
    ("huge", "All work and no play makes Jack a dull boy. " * 5000, None),
    ("normal", "The licence grants the right to copy and distribute.", None),
]


def test_bad_input_zoo_keeps_every_row(tmp_path, sentencepiece_model):
    hf = checkpoint(tmp_path, sentencepiece_model, num_labels=3, id2label=LABELS)
    pipe = ClassificationPipeline(tmp_path, dtype="float32")
    texts = [t for _, t, _ in ZOO] * 2
    out = pipe(pa.table({"text": pa.array(texts, type=pa.string()), "n": list(range(len(texts)))}))
    assert out.num_rows == len(texts) and out.column("n").to_pylist() == list(range(len(texts)))
    for i, (name, text, error) in enumerate(ZOO * 2):
        assert out.column("error")[i].as_py() == error, name
        if error is None:
            probs = torch.softmax(reference_logits(hf, pipe.tokenizer, text), -1)  # huge: the window's worth
            torch.testing.assert_close(torch.tensor(out.column("probs")[i].as_py()), probs, atol=1e-4, rtol=0)
        else:
            assert out.column("label")[i].as_py() is None and out.column("probs")[i].as_py() is None
    assert pipe.stats.errors == 6 and pipe.stats.truncated == 2


def test_zero_shot_template_must_fit(tmp_path, sentencepiece_model):
    checkpoint(tmp_path, sentencepiece_model, kind="causal")
    with pytest.raises(ValueError, match="the prompt template alone takes .* tokens; max_length is"):
        ClassificationPipeline(tmp_path, candidate_labels=["a", "b"], prompt_template="{text} " + "padding words " * 40)
    with pytest.raises(ValueError, match="candidate_labels: labels must be distinct"):
        ClassificationPipeline(tmp_path, candidate_labels=["a", "a"])


def test_column_problems(tmp_path, sentencepiece_model):
    checkpoint(tmp_path, sentencepiece_model, num_labels=3, id2label=LABELS)
    pipe = ClassificationPipeline(tmp_path, dtype="float32", text_column="body")
    with pytest.raises(ValueError, match="text column 'body' not in the input; its columns are \\['text'\\]"):
        pipe(pa.table({"text": ["x"]}))
    out = pipe(pa.table({"body": [1, 2, None]}))  # not text: every row says so, none is lost
    assert out.column("error").to_pylist() == ["text column 'body' holds int64, not strings"] * 3
    out = pipe(pa.table({"body": pa.array([b"fine text", b"\xff\xfe broken", None], type=pa.binary())}))
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[1].startswith("text is not valid UTF-8") and errors[2] == "text is null"
    with pytest.raises(ValueError, match=r"already has column\(s\) \['label'\]"):
        pipe(pa.table({"body": ["x"], "label": ["y"]}))
    empty = pipe(pa.table({"body": pa.array([], type=pa.string())}))
    assert empty.num_rows == 0 and "label" in empty.schema.names


def test_bf16_close_to_fp32(tmp_path, sentencepiece_model):
    checkpoint(tmp_path, sentencepiece_model, num_labels=3, id2label=LABELS)
    texts = [p[:300] for p in paragraphs()[500:520]]
    exact = ClassificationPipeline(tmp_path, dtype="float32")(pa.table({"text": texts}))
    low = ClassificationPipeline(tmp_path, dtype="bfloat16")(pa.table({"text": texts}))
    a = torch.tensor(exact.column("probs").to_pylist())
    b = torch.tensor(low.column("probs").to_pylist())
    assert (a - b).abs().max() < 0.03


def test_progress_is_reported_per_model_batch(tmp_path, sentencepiece_model):
    """A record batch's rows are reported as each model batch finishes, not once at the end: a bar over a
    few large record batches moves."""
    checkpoint(tmp_path, sentencepiece_model, num_labels=3, id2label=LABELS)
    pipe = ClassificationPipeline(tmp_path, dtype="float32", batch_tokens=200)
    seen = []
    pipe.on_rows = seen.append
    texts = texts_of_mixed_length(pipe.tokenizer) + [None, ""]
    pipe(pa.table({"text": pa.array(texts, pa.string())}))
    assert sum(seen) == len(texts) and len(seen) >= 4 and max(seen) < len(texts) / 2
