"""Batched generation: equal to transformers' greedy generate, equal to each row alone, reproducible sampling."""

from __future__ import annotations

import pytest
import torch

from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.generate import generate
from tests.conftest import build_hf_model
from jobs.corpus import paragraphs

PROMPTS = [p[:n] for p, n in zip(paragraphs()[10:18], (40, 200, 15, 120, 80, 300, 5, 160))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sentencepiece_model):
    path = tmp_path_factory.mktemp("gen")
    hf = build_hf_model(path, "causal", seed=5, max_position_embeddings=256)
    tok = PersimmonTokenizer(sentencepiece_model)
    return hf, PersimmonForCausalLM.from_pretrained(path), tok


def row_alone(model, tok, prompt, **kw):
    ids, mask = tok.batch([prompt])
    return generate(model, ids, mask, decode=tok.decode, **kw)


def test_greedy_equals_transformers_and_rows_alone(setup):
    hf, model, tok = setup
    ids, mask = tok.batch(PROMPTS, padding_side="left")
    T, new = ids.shape[1], 24
    ours = generate(model, ids, mask, max_new_tokens=new, eos_token_id=[])
    # an EOS that some row really emits mid-way, so stopping is exercised too
    eos = ours.tokens[1][new // 2]
    ours = generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos)
    assert "eos" in ours.finish_reasons and "length" in ours.finish_reasons
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.padding_id)
    for i in range(len(PROMPTS)):
        mine = ours.tokens[i]
        assert theirs[i, T : T + len(mine)].tolist() == mine, f"row {i}"
        if ours.finish_reasons[i] == "eos":
            assert mine[-1] == eos and (theirs[i, T + len(mine):] == tok.padding_id).all()
        alone = row_alone(model, tok, PROMPTS[i], max_new_tokens=new, eos_token_id=eos)
        assert alone.tokens[0] == mine and alone.finish_reasons[0] == ours.finish_reasons[i]
    # the contract's method returns the same sequences
    assert torch.equal(model.generate(ids, mask, max_new_tokens=new, eos_token_id=eos), ours.sequences)


def test_right_padded_input_is_realigned(setup):
    _, model, tok = setup
    left = generate(model, *tok.batch(PROMPTS[:3], padding_side="left"), max_new_tokens=8)
    right = generate(model, *tok.batch(PROMPTS[:3], padding_side="right"), max_new_tokens=8)
    assert left.tokens == right.tokens


SAMPLING = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)


def test_sampling_same_seed_same_output_across_batch_sizes_and_orders(setup):
    _, model, tok = setup
    prompts = PROMPTS
    by_prompt = {}
    for size in (1, 3, 8):
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            out = generate(model, *tok.batch(chunk), max_new_tokens=16, sampling=SAMPLING, eos_token_id=[])
            for prompt, toks in zip(chunk, out.tokens):
                by_prompt.setdefault(prompt, []).append(toks)
    reordered = list(reversed(prompts))
    out = generate(model, *tok.batch(reordered), max_new_tokens=16, sampling=SAMPLING, eos_token_id=[])
    for prompt, toks in zip(reordered, out.tokens):
        by_prompt[prompt].append(toks)
    for prompt, runs in by_prompt.items():
        assert all(r == runs[0] for r in runs), prompt[:30]
    # sampling really samples: it differs from greedy somewhere
    greedy = generate(model, *tok.batch(prompts), max_new_tokens=16, eos_token_id=[])
    assert [by_prompt[p][0] for p in prompts] != greedy.tokens


def test_different_seeds_differ(setup):
    _, model, tok = setup
    ids, mask = tok.batch(PROMPTS)
    a = generate(model, ids, mask, max_new_tokens=16, sampling=SAMPLING, eos_token_id=[])
    b = generate(model, ids, mask, max_new_tokens=16, eos_token_id=[],
                 sampling=SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=4321))
    assert a.tokens != b.tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-4, seed=7),
    SamplingParams(temperature=1.5, top_k=1, seed=7),
    SamplingParams(temperature=1.0, top_p=1e-6, seed=7),
], ids=["temperature-to-0", "top-k-1", "top-p-tiny"])
def test_degenerate_sampling_equals_greedy(setup, params):
    _, model, tok = setup
    ids, mask = tok.batch(PROMPTS)
    greedy = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert generate(model, ids, mask, max_new_tokens=12, sampling=params, eos_token_id=[]).tokens == greedy.tokens


def test_stop_strings_cut_exactly(setup):
    _, model, tok = setup
    ids, mask = tok.batch(PROMPTS)
    free = generate(model, ids, mask, max_new_tokens=30, eos_token_id=[], decode=tok.decode)
    # a stop string taken from the middle of row 0's free-running completion
    text = free.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = generate(model, ids, mask, max_new_tokens=30, eos_token_id=[], decode=tok.decode, stop=[stop, "\x00never"])
    assert out.finish_reasons[0] == "stop"
    assert out.texts[0] == text[: text.find(stop)]
    assert out.tokens[0] == free.tokens[0][: len(out.tokens[0])]
    assert stop in tok.decode(out.tokens[0]) and stop not in tok.decode(out.tokens[0][:-1])
    for i in range(1, len(PROMPTS)):  # other rows: stopped at their own first occurrence, or ran to length
        if out.finish_reasons[i] == "stop":
            assert out.texts[i] == free.texts[i][: free.texts[i].find(stop)]
        else:
            assert out.finish_reasons[i] == "length" and stop not in free.texts[i]
            assert out.texts[i] == free.texts[i]


def test_finish_reasons_and_lengths(setup):
    _, model, tok = setup
    ids, mask = tok.batch(PROMPTS[:2])
    out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert out.finish_reasons == ["length", "length"] and all(len(t) == 5 for t in out.tokens)
    assert out.sequences.shape == (2, ids.shape[1] + 5)
    assert out.prompt_lengths == mask.sum(-1).tolist()
    none = generate(model, ids, mask, max_new_tokens=0)
    assert none.tokens == [[], []] and torch.equal(none.sequences, ids)


def test_bad_arguments(setup):
    _, model, tok = setup
    ids, mask = tok.batch(PROMPTS[:2])
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="stop strings need a decode function"):
        generate(model, ids, mask, stop=["x"])
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, ids, mask)
