"""GenerationPipeline: completions equal generation of each row alone, template and truncation, bad rows."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
import torch

from persimmon import PersimmonConfig, SamplingParams
from persimmon.engine import SlotPool
from persimmon.generate import generate
from pipelines import GenerationPipeline
from tests.conftest import build_hf_model
from jobs.corpus import paragraphs

TEMPLATE = "human: {text}\n\nadept:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentencepiece_model):
    root = tmp_path_factory.mktemp("genpipe")
    build_hf_model(root, "causal", seed=3, tokenizer=sentencepiece_model, max_position_embeddings=128)
    return root


def kv_gib(model_dir, positions: int) -> float:
    """--kv-cache-gib for a cache of this many positions (fp32)."""
    config = PersimmonConfig.from_pretrained(model_dir)
    return positions * SlotPool.bytes_per_position(config, torch.float32) / (1 << 30)


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
    small = GenerationPipeline(model_dir, max_new_tokens=10, sampling=sampling, dtype="float32", kv_cache_gib=kv_gib(model_dir, 80))
    large = GenerationPipeline(model_dir, max_new_tokens=10, sampling=sampling, dtype="float32", kv_cache_gib=kv_gib(model_dir, 10000))
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
    with pytest.raises(ValueError, match="leave no room for a prompt"):
        GenerationPipeline(model_dir, max_new_tokens=500)
    with pytest.raises(ValueError, match="max_new_tokens: must be at least 1"):
        GenerationPipeline(model_dir, max_new_tokens=0)


def test_a_stream_of_batches_comes_back_in_order_equal_to_each_row_alone(model_dir):
    """Three record batches through one engine with room for 3 rows: rows of a batch finish while the next
    batch's rows start; each output table holds its batch's rows in order, each equal to the row alone."""
    sampling = SamplingParams(temperature=0.8, seed=5)
    pipe = GenerationPipeline(model_dir, prompt_template=TEMPLATE, max_new_tokens=10, sampling=sampling,
                              dtype="float32", kv_cache_gib=kv_gib(model_dir, 3 * 128))
    texts = [p[: 20 + 31 * i % 200] for i, p in enumerate(paragraphs()[640:652])]
    batches = [pa.table({"text": texts[:5], "k": list(range(5))}),
               pa.table({"text": [None, "", "   "], "k": [5, 6, 7]}),  # no row reaches the engine
               pa.table({"text": texts[5:], "k": list(range(8, 15))})]
    outs = list(pipe.stream(iter(batches)))
    assert [o.column("k").to_pylist() for o in outs] == [b.column("k").to_pylist() for b in batches]
    assert pipe.engine.slots == 3 and pipe.engine.counters["decode_steps"] > 0
    tok = pipe.tokenizer
    completions = [c for o in outs for c in o.column("completion").to_pylist() if c is not None]
    for text, completion in zip(texts, completions):
        prompt, _ = pipe.template.encode(tok, text, pipe.max_length, "left")
        alone = generate(pipe.model, torch.tensor([prompt]), max_new_tokens=10, sampling=sampling, decode=tok.decode)
        assert completion == alone.texts[0]
    assert outs[1].column("error").to_pylist() == ["text is null", "text is empty", "text is only whitespace"]


def test_a_vocabulary_padded_past_the_tokenizer_never_yields_an_undecodable_id(tmp_path, sentencepiece_model):
    """Fine-tunes often pad the embedding matrix past the tokenizer: those ids must never be generated."""
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=str(sentencepiece_model)).get_piece_size()
    hf = build_hf_model(tmp_path, "causal", seed=4, vocab_size=size + 64, max_position_embeddings=128)
    with torch.no_grad():
        hf.lm_head.weight[size:] *= 40  # the padded ids dominate the distribution
    hf.save_pretrained(tmp_path)
    shutil.copyfile(sentencepiece_model, tmp_path / "tokenizer.model")
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, seed=2)):
        pipe = GenerationPipeline(tmp_path, max_new_tokens=12, sampling=sampling, dtype="float32")
        out = pipe(pa.table({"text": [p[:80] for p in paragraphs()[660:666]]}))
        assert out.column("error").to_pylist() == [None] * 6
        assert all(n > 0 for n in out.column("completion_tokens").to_pylist())


def test_progress_is_reported_as_rows_finish(tmp_path, sentencepiece_model):
    build_hf_model(tmp_path, "causal", tokenizer=sentencepiece_model, max_position_embeddings=64)
    pipe = GenerationPipeline(tmp_path, dtype="float32", max_new_tokens=4, kv_cache_gib=kv_gib(tmp_path, 256))
    seen = []
    pipe.on_rows = seen.append
    texts = [f"row number {i} says something" for i in range(30)] + [None]
    out = pipe(pa.table({"text": pa.array(texts, pa.string())}))
    assert out.num_rows == 31 and sum(seen) == 31 and len(seen) > 2
