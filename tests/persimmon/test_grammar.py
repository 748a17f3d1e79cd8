"""Constrained decoding and logprobs on a random-weight model with a padded vocabulary (the model has more
embeddings than the tokenizer has pieces, as the real 8B does): every completion under a JSON schema, a
regex, choices or a Lark grammar is valid, greedy and sampled; no id past the tokenizer is produced; a
constrained row that joins mid-decode gives what it gives alone; logprobs equal transformers' log-softmax."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from jobs.corpus import paragraphs
from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.engine import INCOMPLETE, GenerationEngine, Request
from persimmon.grammar import Grammar, GrammarError, Vocabulary
from tests.conftest import build_hf_model
from tests.oracle import naive_generate

VOCAB = 512  # the tokenizer has 384 pieces: ids 384..511 are padding the tokenizer cannot write
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "product": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
        "urgent": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 2},
    },
    "required": ["sentiment", "product", "urgent"],
}
REGEX = r"[a-z]{2,5}-[0-9]{2,4}"
CHOICES = ["red", "green", "blue", "dark green"]
LARK = 'start: "SELECT " COL (", " COL)* " FROM t"\nCOL: /[a-z]{1,4}/'
SAMPLED = SamplingParams(temperature=1.0, seed=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sentencepiece_model):
    path = tmp_path_factory.mktemp("grammar")
    hf = build_hf_model(path, "causal", seed=8, vocab_size=VOCAB, max_position_embeddings=256)
    with torch.no_grad():  # the padded ids would win most argmaxes: they must still never appear
        hf.lm_head.weight[384:] *= 30
    hf.save_pretrained(path)
    tok = PersimmonTokenizer(sentencepiece_model)
    model = PersimmonForCausalLM.from_pretrained(path)
    return hf, model, tok, Vocabulary(tok, VOCAB)


def prompts(tok, n=6):
    return [tok.encode(f"human: {p[:40 + 13 * i]}\n\nadept:") for i, p in enumerate(paragraphs()[30:30 + n])]


def run(model, tok, vocab, rows, params, slots=None):
    engine = GenerationEngine(model, 100, decode=tok.decode, vocabulary=vocab, eos_token_id=tok.eos_token_id,
                              token_budget=(slots or 16) * 192, vocab_limit=tok.vocab_size)
    return {c.key: c for c in engine.run(Request(i, r, params) for i, r in enumerate(rows))}, engine


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["json_schema", "regex", "choices", "lark"])
def test_every_completion_is_valid(setup, kind, sampling):
    _, model, tok, vocab = setup
    grammar = {"json_schema": Grammar.json_schema(SCHEMA), "regex": Grammar.regex(REGEX),
               "choices": Grammar.choices(CHOICES), "lark": Grammar.lark(LARK)}[kind]
    params = SamplingParams(sampling.temperature, seed=sampling.seed, max_new_tokens=100, grammar=grammar)
    done, engine = run(model, tok, vocab, prompts(tok), params)
    complete = 0
    for c in done.values():
        assert max(c.tokens) < tok.vocab_size
        if c.error == INCOMPLETE:  # cut by max_new_tokens: allowed, and said
            assert c.finish_reason == "length"
            continue
        assert c.error is None and c.finish_reason in ("stop", "eos"), (c.finish_reason, c.text)
        complete += 1
        if kind == "json_schema":
            jsonschema.validate(json.loads(c.text), SCHEMA)
            assert " " not in c.text.replace(c.text and json.loads(c.text)["product"], "")  # compact
        elif kind == "regex":
            assert re.fullmatch(REGEX, c.text), c.text
        elif kind == "choices":
            assert c.text in CHOICES
        else:
            assert re.fullmatch(r"SELECT [a-z]{1,4}(, [a-z]{1,4})* FROM t", c.text), c.text
    assert complete >= len(done) - 1
    assert engine.counters["mask_rows"] > 0 and engine.seconds["mask"] > 0


def test_a_constrained_row_joining_mid_decode_gives_what_it_gives_alone(setup):
    """Two slots for six rows, half constrained (greedy and sampled): each row's tokens equal the naive
    loop's for that row alone, with the grammar's masks computed by a matcher of its own."""
    _, model, tok, vocab = setup
    rows = prompts(tok)
    grammar = Grammar.json_schema(SCHEMA)
    params = [SamplingParams(max_new_tokens=40, grammar=grammar), SamplingParams(max_new_tokens=20),
              SamplingParams(temperature=0.8, seed=5, max_new_tokens=40, grammar=grammar)] * 2
    engine = GenerationEngine(model, 40, decode=tok.decode, vocabulary=vocab, eos_token_id=tok.eos_token_id,
                              token_budget=2 * 192, vocab_limit=tok.vocab_size)
    done = {c.key: c for c in engine.run(Request(i, r, params[i]) for i, r in enumerate(rows))}
    assert engine.slots == 2
    for i, row in enumerate(rows):
        allowed = None
        if params[i].grammar is not None:
            matcher = vocab.matcher(grammar)

            def allowed(out, matcher=matcher):
                if out:
                    assert matcher.consume_token(out[-1])
                bits = vocab.allowed(vocab.masks([matcher]), VOCAB)[0]
                return bits
        expected, _ = naive_generate(model, row, params[i].max_new_tokens, params[i], tok.eos_token_id,
                                     vocab_limit=tok.vocab_size, allowed=allowed)
        got = done[i].tokens
        assert got == expected[: len(got)], f"row {i}"
        if params[i].grammar is not None and done[i].error is None:
            jsonschema.validate(json.loads(done[i].text), SCHEMA)


def test_logprobs_equal_transformers_log_softmax(setup):
    hf, model, tok, vocab = setup
    rows = prompts(tok, 3)
    params = SamplingParams(temperature=0.9, seed=2, max_new_tokens=8, logprobs=5)
    done, _ = run(model, tok, vocab, rows, params)
    for i, row in enumerate(rows):
        c = done[i]
        assert len(c.logprobs) == len(c.tokens)
        sequence = torch.tensor([row + c.tokens])
        with torch.no_grad():
            raw = torch.log_softmax(hf(sequence).logits[0].float(), dim=-1)
        for step, entry in enumerate(c.logprobs):
            theirs = raw[len(row) - 1 + step]
            assert entry.id == c.tokens[step]
            assert abs(entry.logprob - theirs[entry.id].item()) < 1e-4
            top = torch.topk(theirs, 5)
            assert [i for i, _ in entry.top] == top.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(entry.top, top.values.tolist())) < 1e-4


def test_vocabulary_as_bytes_and_bad_grammars(setup):
    _, _, tok, vocab = setup
    sp = tok.sp
    space = next(i for i in range(tok.vocab_size) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1)
    assert vocab.tokens[space] == sp.id_to_piece(space).replace("\u2581", " ").encode()
    byte = sp.piece_to_id("<0x41>")
    assert vocab.tokens[byte] == b"A"
    assert vocab.tokens[tok.eos_token_id].startswith(b"\xff")  # special: no text matches it
    assert vocab.size == VOCAB and len(vocab.tokens) == tok.vocab_size
    text = "Zebras ünd 42 {}"
    assert vocab.decode(tok.encode(text, add_bos=False)).lstrip() == text
    for bad, message in ((lambda: Grammar.json_schema("{not json"), "not valid JSON"),
                         (lambda: Grammar.regex("[a-").check(), "does not compile"),
                         (lambda: Grammar.lark("start: undefined_rule").check(), "does not compile"),
                         (lambda: Grammar.choices([]), "non-empty")):
        with pytest.raises(GrammarError, match=message):
            bad()


def test_compiled_grammars_are_bounded_least_recently_used_first(setup):
    from persimmon.grammar import COMPILED_GRAMMARS

    _, _, tok, _ = setup
    vocab = Vocabulary(tok, VOCAB)
    grammars = [Grammar.regex(f"a{{{i}}}b") for i in range(1, COMPILED_GRAMMARS + 10)]
    for i, grammar in enumerate(grammars):
        vocab.matcher(grammar)
        vocab.matcher(grammars[0])  # kept in use: never the least recent
    assert len(vocab._compiled) == COMPILED_GRAMMARS
    assert grammars[0] in vocab._compiled and grammars[1] not in vocab._compiled and grammars[-1] in vocab._compiled


def test_a_constraint_is_compiled_once_however_many_layers_check_it(monkeypatch, tmp_path):
    """The CLI's flags, the spec's validation and each pipeline's options all check the constraint: one
    compile per process decides it (a bad one stays refused each time, with the same message)."""
    from llguidance import LLMatcher

    from pipelines.options import GenerateOptions

    calls = []
    real = LLMatcher.validate_grammar

    def counting(text, *args, **kwargs):
        calls.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(LLMatcher, "validate_grammar", counting)
    schema = tmp_path / "once.schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"once": {"type": "integer"}}}))
    options = GenerateOptions(json_schema=str(schema))
    for _ in range(3):
        assert options.problems() == [] and options.resolved().problems() == []
    assert len(calls) == 1
    bad = GenerateOptions(regex="(unclosed")
    first, second = bad.problems(), bad.problems()
    assert first == second and "does not compile" in first[0] and len(calls) == 2
