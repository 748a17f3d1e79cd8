"""Constrained against unconstrained decoding, and score against classify, on the same rows in one run.

    .venv/bin/python bench/bench_structured.py [--rows 32] [--new-tokens 48] [--dtypes float32,bfloat16]
    .venv/bin/python bench/bench_structured.py score [--rows 1000]

generate: the same chat prompts of real text through one GenerationEngine, unconstrained and under a 4-field
JSON schema (an enum, a bounded string, a boolean, a bounded integer), greedy. Decode throughput is
generated tokens per second of engine time (prefill and decode steps); the unconstrained side has no EOS, so
both decode full batches. Also: mask time per decode step (computed on the mask thread) and what of it the
forward pass did not hide (the wait before sampling).

score: ScorePipeline (a causal LM) against ClassificationPipeline (a classifier of the same shape) over the
same rows: rows per second of each, and their ratio (one prefill per row either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pyarrow as pa
import torch
from common import BENCH_MODEL, build, machine

from jobs.corpus import paragraphs
from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.engine import GenerationEngine, Request
from persimmon.grammar import Grammar, Vocabulary

SCHEMA = {"type": "object", "properties": {
    "sentiment": {"enum": ["positive", "negative", "neutral"]},
    "topic": {"type": "string", "pattern": "^[a-z ]{1,24}$"},
    "urgent": {"type": "boolean"},
    "priority": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["sentiment", "topic", "urgent", "priority"]}


def generation(args) -> None:
    _, path = build("causal")
    tok = PersimmonTokenizer.from_pretrained(path)
    texts = [p[: 200 + (i * 131) % 600] for i, p in enumerate(paragraphs()[200 : 200 + args.rows])]
    rows = [tok.encode(f"human: Extract the ticket's fields as JSON.\n\n{t}\n\nadept:") for t in texts]
    vocab = Vocabulary(tok)
    grammar = Grammar.json_schema(SCHEMA)
    print(f"model {BENCH_MODEL}, vocab {tok.vocab_size}; {machine()}")
    print(f"{len(rows)} prompts of {min(map(len, rows))}..{max(map(len, rows))} tokens, up to {args.new_tokens} new, greedy")
    for dtype in args.dtypes.split(","):
        model = PersimmonForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

        def run(params):
            engine = GenerationEngine(model, args.new_tokens, params, eos_token_id=[], decode=tok.decode,
                                      vocabulary=vocab, vocab_limit=tok.vocab_size)
            start = time.perf_counter()
            done = list(engine.run(Request(i, r) for i, r in enumerate(rows)))
            return engine, done, time.perf_counter() - start

        free = SamplingParams(max_new_tokens=args.new_tokens)
        bound = SamplingParams(max_new_tokens=args.new_tokens, grammar=grammar)
        run(free), run(bound)  # warm up (and compile the grammar once)
        results = {"unconstrained": [], "constrained": []}
        for _ in range(args.repeats):  # alternate, so drift in the machine's speed falls on both
            for name, params in (("unconstrained", free), ("constrained", bound)):
                results[name].append(run(params))
        rates = {}
        for name, runs in results.items():
            engine, done, _ = runs[-1]
            per = sorted(sum(len(c.tokens) for c in d) / (e.seconds["prefill"] + e.seconds["decode"]) for e, d, _ in runs)
            rates[name] = per[len(per) // 2]
            tokens, steps = sum(len(c.tokens) for c in done), engine.counters["decode_steps"]
            seconds = engine.seconds["prefill"] + engine.seconds["decode"]
            line = (f"{dtype:9s} {name:13s}: {rates[name]:8.1f} tokens/s ({tokens} tokens in {steps} steps: "
                    f"{tokens / steps:.1f} rows/step, {1e3 * seconds / steps:.1f} ms/step)")
            if name == "constrained":
                steps = engine.counters["mask_steps"]
                valid = sum(1 for c in done if c.error is None and json.loads(c.text) is not None)
                line += (f"; mask {1e3 * engine.seconds['mask'] / steps:.2f} ms/step for "
                         f"{engine.counters['mask_rows'] / steps:.1f} rows, unhidden {1e3 * engine.seconds['mask_wait'] / steps:.2f} ms/step; "
                         f"{valid}/{len(done)} complete and valid")
            print(line)
        print(f"{dtype:9s} ratio constrained/unconstrained: {rates['constrained'] / rates['unconstrained']:.3f}x")


def scoring(args) -> None:
    from pipelines import ClassificationPipeline, ScorePipeline

    _, lm = build("causal")
    _, clf = build("seqcls", num_labels=4, pad_token_id=None)
    texts = [p[: 50 + (i * 97) % 1500] for i, p in enumerate(paragraphs()[: args.rows])]
    table = pa.table({"text": texts})
    print(f"model {BENCH_MODEL}; {machine()}; {len(texts)} rows")
    for dtype in args.dtypes.split(","):
        score = ScorePipeline(lm, dtype=dtype, max_length=512)
        classify = ClassificationPipeline(clf, dtype=dtype, max_length=512)
        times = {"score": [], "classify": []}
        score(table.slice(0, 64)), classify(table.slice(0, 64))
        for _ in range(args.repeats):
            for name, pipe in (("score", score), ("classify", classify)):
                start = time.perf_counter()
                pipe(table)
                times[name].append(time.perf_counter() - start)
        rate = {k: len(texts) / sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{dtype:9s} score {rate['score']:7.1f} rows/s, classify {rate['classify']:7.1f} rows/s, "
              f"ratio score/classify {rate['score'] / rate['classify']:.3f}x")


def main() -> None:
    mode = "score" if len(sys.argv) > 1 and sys.argv[1] == "score" else "generate"
    if mode == "score":
        sys.argv.pop(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32 if mode == "generate" else 1000)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    (generation if mode == "generate" else scoring)(args)


if __name__ == "__main__":
    main()
