"""GenerationPipeline: completions equal generation of each row alone, template and truncation, bad rows."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from persimmon import SamplingParams
from persimmon.generate import generate
from pipelines import GenerationPipeline
from tests.conftest import build_hf_model
from jobs.corpus import paragraphs

TEMPLATE = "human: {text}\n\nadept:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentencepiece_model):
    root = tmp_path_factory.mktemp("genpipe")
    build_hf_model(root, "causal", seed=3, max_position_embeddings=128)
    shutil.copyfile(sentencepiece_model, root / "tokenizer.model")
    return root


def test_completions_equal_rows_alone(model_dir):
    pipe = GenerationPipeline(model_dir, prompt_template=TEMPLATE, max_new_tokens=12, dtype="float32", batch_tokens=300)
    texts = [p[: 15 + 53 * i % 250] for i, p in enumerate(paragraphs()[600:612])]
    out = pipe(pa.table({"text": texts, "k": list(range(12))}))
    assert out.column("k").to_pylist() == list(range(12))
    assert out.schema.field("prompt_tokens").type == pa.int32() and out.schema.field("completion_tokens").type == pa.int32()
    tok = pipe.tokenizer
    truncated = 0
    for i, text in enumerate(texts):
        prompt, cut = pipe.template.encode(tok, text, pipe.max_length, "left")
        if not cut:  # an untruncated prompt is exactly the rendered template
            assert prompt == tok.encode(TEMPLATE.replace("{text}", text))
        truncated += cut
        ids, mask = tok.pad([prompt])
        alone = generate(pipe.model, ids, mask, max_new_tokens=12, decode=tok.decode)
        assert out.column("completion")[i].as_py() == alone.texts[0]
        assert out.column("finish_reason")[i].as_py() == alone.finish_reasons[0]
        assert out.column("prompt_tokens")[i].as_py() == ids.shape[1]
        assert out.column("completion_tokens")[i].as_py() == len(alone.tokens[0])
    assert 0 < truncated == pipe.stats.truncated < len(texts)
    assert pipe.stats.padding.batches > 1 and pipe.stats.generated_tokens == sum(out.column("completion_tokens").to_pylist())


def test_sampled_completions_reproducible_across_batching(model_dir):
    texts = [p[:120] for p in paragraphs()[620:630]]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    small = GenerationPipeline(model_dir, max_new_tokens=10, sampling=sampling, dtype="float32", batch_tokens=80)
    large = GenerationPipeline(model_dir, max_new_tokens=10, sampling=sampling, dtype="float32", batch_tokens=10000)
    a = small(pa.table({"text": texts})).column("completion").to_pylist()
    b = large(pa.table({"text": list(reversed(texts))})).column("completion").to_pylist()
    assert a == list(reversed(b))


def test_truncation_keeps_template_and_stop(model_dir):
    pipe = GenerationPipeline(model_dir, prompt_template=TEMPLATE, max_new_tokens=8, dtype="float32", stop=["\n"])
    long_text = " ".join(paragraphs()[700:720])
    out = pipe(pa.table({"text": [long_text, None, "  "]}))
    assert out.column("prompt_tokens")[0].as_py() == pipe.max_length == 128 - 8
    assert out.column("error").to_pylist() == [None, "text is null", "text is only whitespace"]
    assert out.column("completion")[1].as_py() is None and pipe.stats.truncated == 1
    ids = pipe.template.encode(pipe.tokenizer, long_text, pipe.max_length, "left")[0]
    assert pipe.tokenizer.decode(ids).endswith(long_text[-40:] + "\n\nadept:") and pipe.tokenizer.decode(ids).startswith("human: ")
    assert "\n" not in out.column("completion")[0].as_py()


def test_bad_arguments(model_dir):
    with pytest.raises(ValueError, match="must contain \\{text\\} exactly once"):
        GenerationPipeline(model_dir, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        GenerationPipeline(model_dir, max_new_tokens=500)
    with pytest.raises(ValueError, match="max_new_tokens: must be at least 1"):
        GenerationPipeline(model_dir, max_new_tokens=0)
