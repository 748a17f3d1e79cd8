"""One non-finite rule for every task: a checkpoint with a NaN weight gives error rows (never confident-looking
output) with one message, and every row counts in the `nonfinite` statistic the run warns of."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from tests.conftest import build_hf_model
from tests.pipelines.test_batch_api_lines import run_file

MESSAGE = "model produced non-finite scores"  # what docs/output.md promises the `error` column says
TEXTS = ["one row of text", "a second, longer row of text"]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, sentencepiece_model):
    """A causal checkpoint and a classifier, each with a NaN in its final layer norm."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("nonfinite")
    paths = {}
    for kind in ("causal", "seqcls"):
        path = root / kind
        build_hf_model(path, kind, tokenizer=sentencepiece_model, max_position_embeddings=128)
        weights = load_file(path / "model.safetensors")
        weights["model.final_layernorm.weight"][0] = float("nan")
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        paths[kind] = path
    return paths


@pytest.mark.parametrize("task", ["classify", "zero-shot", "embed", "score", "generate", "generate-json"])
def test_every_task_makes_nan_output_an_error_row_with_one_message(poisoned, task):
    from pipelines import ClassificationPipeline, EmbeddingPipeline, GenerationPipeline, ScorePipeline

    build = {
        "classify": lambda: ClassificationPipeline(poisoned["seqcls"], dtype="float32"),
        "zero-shot": lambda: ClassificationPipeline(poisoned["causal"], dtype="float32",
                                                    candidate_labels=["yes", "no"]),
        "embed": lambda: EmbeddingPipeline(poisoned["causal"], dtype="float32"),
        "score": lambda: ScorePipeline(poisoned["causal"], dtype="float32"),
        "generate": lambda: GenerationPipeline(poisoned["causal"], dtype="float32", max_new_tokens=4),
        "generate-json": lambda: GenerationPipeline(poisoned["causal"], dtype="float32", max_new_tokens=4,
                                                    json_schema='{"type": "object"}'),
    }[task]
    pipe = build()
    out = pipe(pa.table({"text": TEXTS}))
    assert out.column("error").to_pylist() == [MESSAGE] * len(TEXTS)
    assert pipe.stats.as_dict()["nonfinite"] == len(TEXTS)


def test_the_batch_api_answers_nan_output_with_the_same_message(poisoned):
    from pipelines import OpenAIBatchPipeline

    pipe = OpenAIBatchPipeline(poisoned["causal"], max_new_tokens=4)
    lines = [json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "m", "prompt": TEXTS[0]}}),
             json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "m", "input": TEXTS}})]
    records = run_file(pipe, lines)
    assert [r["custom_id"] for r in records] == ["c", "e"]
    for record in records:
        assert record["response"] is None
        assert record["error"] == {"code": "model_error", "message": MESSAGE}
    assert pipe.stats.as_dict()["nonfinite"] == 2
