"""EmbeddingPipeline against transformers' final hidden states, one row at a time, on real text."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipelines import EmbeddingPipeline
from tests.pipelines.test_classify import MAX_POS, checkpoint, texts_of_mixed_length


def reference_hidden(hf, tok, text, side="right"):
    """transformers' last_hidden_state (after the final LayerNorm) of one unpadded row: (T, hidden)."""
    ids = tok.encode_truncated(text, MAX_POS, side).ids
    with torch.no_grad():
        return hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()


@pytest.mark.parametrize("kind,padding_side,pad_id", [("causal", "right", None), ("causal", "left", None),
                                                      ("seqcls", "right", 0), ("seqcls", "left", None)])
def test_last_token_equals_reference_row_by_row(tmp_path, sentencepiece_model, kind, padding_side, pad_id):
    hf = checkpoint(tmp_path, sentencepiece_model, kind, pad_token_id=pad_id)
    pipe = EmbeddingPipeline(tmp_path, dtype="float32", padding_side=padding_side, batch_tokens=400)
    texts = texts_of_mixed_length(pipe.tokenizer)
    out = pipe(pa.table({"id": list(range(len(texts))), "text": texts}))
    assert out.column("id").to_pylist() == list(range(len(texts))) and out.column("text").to_pylist() == texts
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), hf.config.hidden_size)
    # what the pipeline returns prints as its file does once written and read back (Parquet names list items
    # "element", pyarrow "item")
    import pyarrow.parquet as pq

    pq.write_table(out, tmp_path / "out.parquet")
    assert str(pq.read_schema(tmp_path / "out.parquet").remove_metadata()) == str(out.schema.remove_metadata())
    for i, text in enumerate(texts):
        want = reference_hidden(hf, pipe.tokenizer, text)[-1]
        torch.testing.assert_close(torch.tensor(out.column("embedding")[i].as_py()), want, atol=1e-5, rtol=0)
    assert pipe.stats.as_dict()["batches"] > 1 and pipe.stats.as_dict()["truncated"] > 0


def test_last_pooling_is_what_the_classifier_head_scores(tmp_path, sentencepiece_model):
    hf = checkpoint(tmp_path, sentencepiece_model, "seqcls", num_labels=3)
    pipe = EmbeddingPipeline(tmp_path, dtype="float32", batch_tokens=400)
    texts = texts_of_mixed_length(pipe.tokenizer, 12)
    vectors = torch.tensor(pipe(pa.table({"text": texts})).column("embedding").to_pylist())
    for i, text in enumerate(texts):
        ids = pipe.tokenizer.encode_truncated(text, MAX_POS, "right").ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(vectors[i] @ hf.score.weight.T, logits, atol=1e-5, rtol=0)


def test_mean_pooling_and_normalize(tmp_path, sentencepiece_model):
    hf = checkpoint(tmp_path, sentencepiece_model, "causal")
    mean = EmbeddingPipeline(tmp_path, dtype="float32", pooling="mean", padding_side="left", batch_tokens=400)
    unit = EmbeddingPipeline(tmp_path, dtype="float32", pooling="mean", normalize=True, batch_tokens=400)
    texts = texts_of_mixed_length(mean.tokenizer, 16)
    table = pa.table({"text": texts})
    got, got_unit = (torch.tensor(p(table).column("embedding").to_pylist()) for p in (mean, unit))
    for i, text in enumerate(texts):
        want = reference_hidden(hf, mean.tokenizer, text).mean(0)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_unit[i], want / want.norm(), atol=1e-5, rtol=0)


def test_bad_rows_keep_their_place(tmp_path, sentencepiece_model):
    checkpoint(tmp_path, sentencepiece_model, "causal")
    pipe = EmbeddingPipeline(tmp_path, dtype="float32")
    texts = ["a fine sentence", None, "", "   ", "another one \u00e9\u4e2d\U0001F600", "x" * 100_000]
    out = pipe(pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}))
    vectors, errors = out.column("embedding").to_pylist(), out.column("error").to_pylist()
    assert out.column("id").to_pylist() == list(range(len(texts)))
    assert [v is None for v in vectors] == [False, True, True, True, False, False]
    assert errors[1] == "text is null" and errors[2] == "text is empty" and errors[3] == "text is only whitespace"
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert pipe.stats.as_dict()["truncated"] == 1


def test_nan_weights_become_error_rows(tmp_path, sentencepiece_model):
    from safetensors.torch import load_file, save_file

    checkpoint(tmp_path, sentencepiece_model, "causal")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.final_layernorm.weight"][0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    out = EmbeddingPipeline(tmp_path, dtype="float32")(pa.table({"text": ["one row", "two rows"]}))
    assert out.column("embedding").to_pylist() == [None, None]
    assert out.column("error").to_pylist() == ["model produced non-finite scores"] * 2
