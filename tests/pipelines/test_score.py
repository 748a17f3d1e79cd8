"""ScorePipeline: each row's log-likelihood equals transformers' (loss-based, 1e-5 relative in fp32); a
prompt template scores only the text's tokens; bad rows are errors that lose nothing; long rows truncate."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from jobs.corpus import paragraphs
from persimmon import PersimmonTokenizer
from pipelines import ScorePipeline
from tests.conftest import build_hf_model

TEXTS = [p[: 30 + 41 * i] for i, p in enumerate(paragraphs()[50:58])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sentencepiece_model):
    path = tmp_path_factory.mktemp("score")
    hf = build_hf_model(path, "causal", seed=4, tokenizer=sentencepiece_model, max_position_embeddings=128)
    return hf, path, PersimmonTokenizer.from_pretrained(path)


def hf_loglik(hf, ids: list[int]) -> float:
    """transformers' own loss: mean cross-entropy over tokens after the first, times their count."""
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    return -loss * (len(ids) - 1)


def test_equals_transformers_log_likelihood(setup):
    hf, path, tok = setup
    pipe = ScorePipeline(path, batch_tokens=300)  # several length-sorted batches
    out = pipe(pa.table({"text": TEXTS + [None, ""]})).to_pylist()
    for row, text in zip(out, TEXTS):
        ids = tok.encode(text)[:128]
        expected = hf_loglik(hf, ids)
        assert row["error"] is None and row["tokens"] == len(ids) - 1
        assert abs(row["logprob"] - expected) <= 1e-5 * abs(expected)
        assert math.isclose(row["perplexity"], math.exp(-row["logprob"] / row["tokens"]))
    assert out[-2]["error"] == "text is null" and out[-2]["logprob"] is None
    assert out[-1]["error"] == "text is empty" and out[-1]["tokens"] is None
    truncated = [r for r, t in zip(out, TEXTS) if len(tok.encode(t)) > 128]
    assert truncated and all(r["tokens"] == 127 for r in truncated)
    assert pipe.stats.truncated == len(truncated)


def test_a_template_scores_only_the_text(setup):
    hf, path, tok = setup
    prefix, suffix = "Review:\n", "\n\nScore it."
    pipe = ScorePipeline(path, prompt_template=prefix + "{text}" + suffix)
    texts = TEXTS[:3]  # short enough to need no truncation
    out = pipe(pa.table({"text": texts})).to_pylist()
    head = tok.encode(prefix)
    for row, text in zip(out, texts):
        ids = tok.encode(prefix + text + suffix)
        tail = len(tok.encode(prefix + text + suffix)) - len(tok.encode(prefix + text))
        assert ids[: len(head)] == head  # this prefix tokenizes the same before any text
        with torch.no_grad():
            raw = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
        span = range(len(head), len(ids) - tail)
        expected = sum(raw[t - 1, ids[t]].item() for t in span)
        assert row["tokens"] == len(span)
        assert abs(row["logprob"] - expected) <= 1e-5 * abs(expected)
