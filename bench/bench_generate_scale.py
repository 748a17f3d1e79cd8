"""Generation at job scale: many prompts whose completions end at EOS anywhere, ours against transformers.

    .venv/bin/python bench/bench_generate_scale.py [--prompts 256] [--new-tokens 128] [--dtypes float32,bfloat16]

The model (hidden 512, 6 layers, vocabulary from a 2000-piece tokenizer trained on this machine's text) gets
EOS made likely: lm_head's EOS row is shifted along the mean final hidden state of real text, tuned so that
EOS takes about 2% of the probability per step. 256 real-text prompts of 5..170 tokens, sampled completions
(temperature 1), up to 128 new tokens. Measured in one run, per dtype:
  - ours: the continuous-batching engine (persimmon.engine, what GenerationPipeline runs);
  - transformers `generate_batch` (its continuous batching);
  - transformers `generate` in static batches of 32 in input order (the Ray Data recipe's inner loop);
  - ours with every row running to max_new_tokens (no EOS: batches stay full), the full-batch rate; the
    efficiency is the mixed-length rate over it.
Then the shared prefix: the same prompts behind a 300-token instruction, prefilled with and without sharing
the instruction's keys and values (max_new_tokens 1), seconds of prefill per row for each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import build, machine

from jobs.corpus import paragraphs
from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.engine import GenerationEngine, Request

SEED = 0


def eos_likely(hf, tok: PersimmonTokenizer, target: float = 0.02) -> float:
    """Shift lm_head's EOS row along the mean final hidden state of real text until EOS has about `target`
    probability per position; returns the mean probability reached."""
    texts = list(paragraphs())[300:340]
    ids, mask = tok.batch(texts, padding_side="right", max_length=160)
    with torch.inference_mode():
        hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]  # (N, hidden)
        direction = hidden.mean(0)
        base = hf.lm_head.weight[tok.eos_token_id].clone()

        def p_eos(alpha: float) -> float:
            hf.lm_head.weight[tok.eos_token_id] = base + alpha * direction
            return torch.softmax(hf.lm_head(hidden).float(), -1)[:, tok.eos_token_id].mean().item()

        low, high = 0.0, 1.0
        while p_eos(high) < target:
            high *= 2
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (mid, high) if p_eos(mid) < target else (low, mid)
        return p_eos(high)


def prompts(tok: PersimmonTokenizer, n: int) -> list[list[int]]:
    """n real-text prompts of 5..170 tokens (BOS included), lengths spread evenly."""
    texts = list(paragraphs())
    out = []
    for i in range(n):
        length = 5 + (i * 37) % 166
        ids = tok.encode(" ".join(texts[(7 * i + j) % len(texts)] for j in range(4)))
        out.append(ids[:length])
    return out


def ours(model, rows: list[list[int]], new: int, eos, budget: int, prefix=None):
    engine = GenerationEngine(model, new, SamplingParams(temperature=1.0, seed=SEED), eos_token_id=eos,
                              token_budget=budget, prefix_ids=prefix)
    start = time.perf_counter()
    lengths = [len(c.tokens) for c in engine.run(Request(i, r) for i, r in enumerate(rows))]
    return time.perf_counter() - start, lengths, engine


def theirs_continuous(hf, rows, new: int, eos: int, pad: int):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=eos, pad_token_id=pad)
    hf.generate_batch(rows[:4], generation_config=config)  # warm-up
    start = time.perf_counter()
    out = hf.generate_batch(rows, generation_config=config)
    return time.perf_counter() - start, [len(o.generated_tokens) for o in out.values()]


def theirs_static(hf, rows, new: int, eos: int, pad: int, batch: int = 32):
    lengths = []
    start = time.perf_counter()
    for b in range(0, len(rows), batch):
        group = rows[b:b + batch]
        width = max(len(r) for r in group)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in group])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in group])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, width:].tolist():
            lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return time.perf_counter() - start, lengths


def describe(lengths: list[int]) -> str:
    q = statistics.quantiles(lengths, n=4)
    return (f"mean {statistics.mean(lengths):.1f}, min {min(lengths)}, quartiles {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, "
            f"max {max(lengths)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16384, help="ours: KV-cache positions over all slots")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-static", action="store_true", help="leave out transformers' static batches (slow)")
    args = ap.parse_args()
    hf, path = build("causal", vocab_size=2000)
    tok = PersimmonTokenizer.from_pretrained(path)
    reached = eos_likely(hf, tok)
    hf.save_pretrained(path)
    rows = prompts(tok, args.prompts)
    new = args.new_tokens
    print(f"hidden 512, 6 layers, vocab {hf.config.vocab_size}; {machine()}")
    print(f"{len(rows)} prompts of {min(map(len, rows))}..{max(map(len, rows))} tokens, up to {new} new tokens, "
          f"temperature 1; EOS probability per position on real text {reached:.3f}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = PersimmonForCausalLM.from_pretrained(path, dtype=dtype)
        ref = hf.to(dtype)
        ours(model, rows[:8], 8, tok.eos_token_id, args.budget)  # warm-up
        t_ours, l_ours, engine = ours(model, rows, new, tok.eos_token_id, args.budget)
        t_full, l_full, full = ours(model, rows, new, [], args.budget)
        t_cb, l_cb = theirs_continuous(ref, rows, new, tok.eos_token_id, tok.padding_id)
        rate_ours, rate_full, rate_cb = sum(l_ours) / t_ours, sum(l_full) / t_full, sum(l_cb) / t_cb
        print(f"\n== {name}: {engine.slots} slots of {engine.pool.capacity} positions")
        print(f"completion lengths, ours: {describe(l_ours)}")
        print(f"completion lengths, transformers generate_batch: {describe(l_cb)}")
        print(f"ours (engine):                   {rate_ours:8.1f} tok/s ({sum(l_ours)} tokens, {t_ours:.1f} s)")
        print(f"ours, every row to {new} tokens:  {rate_full:8.1f} tok/s (full-batch rate)")
        print(f"transformers generate_batch:     {rate_cb:8.1f} tok/s")
        print(f"efficiency (mixed / full-batch rate): {rate_ours / rate_full:.2f}")
        # where the time goes: prefill is paid per prompt, so it weighs more per token when completions are short
        decode_mixed = sum(l_ours) / engine.seconds["decode"]
        decode_full = sum(l_full) / full.seconds["decode"]
        best = sum(l_ours) / (sum(l_ours) / decode_full + full.seconds["prefill"])
        print(f"  prefill {engine.seconds['prefill']:.1f} s of {t_ours:.1f} (mixed), {full.seconds['prefill']:.1f} s of "
              f"{t_full:.1f} (full); rows per decode step {engine.counters['decode_rows'] / engine.counters['decode_steps']:.1f} "
              f"(mixed) vs {full.counters['decode_rows'] / full.counters['decode_steps']:.1f} (full) of {engine.slots}")
        print(f"  decode-step efficiency (tokens per decode second, mixed / full): {decode_mixed / decode_full:.2f}; "
              f"bound on the efficiency with the full run's prefill time and decode rate: {best / rate_full:.2f}")
        print(f"ours / generate_batch: {rate_ours / rate_cb:.2f}x")
        if not args.skip_static:
            t_st, l_st = theirs_static(ref, rows, new, tok.eos_token_id, tok.padding_id)
            rate_st = sum(l_st) / t_st
            print(f"transformers generate, static batches of 32: {rate_st:8.1f} tok/s; ours / it: {rate_ours / rate_st:.2f}x")

        # the shared prefix: a 300-token instruction in front of every prompt
        instruction = tok.encode(" ".join(list(paragraphs())[500:520]))[:300]
        prefixed = [instruction + r[1:] for r in rows[:64]]
        shared = ours(model, prefixed, 1, [], args.budget, prefix=instruction)
        alone = ours(model, prefixed, 1, [], args.budget)
        print(f"300-token shared prefix, prefill per row: shared {1000 * shared[0] / len(prefixed):.1f} ms, "
              f"not shared {1000 * alone[0] / len(prefixed):.1f} ms ({alone[0] / shared[0]:.1f}x)")


if __name__ == "__main__":
    main()
