"""Generation throughput: ours against transformers' `generate`, same model and prompts, in one run.

    .venv/bin/python bench/bench_generate.py [--batch 16] [--new-tokens 64] [--dtype float32]

Batch of real-text prompts of mixed lengths, greedy, a fixed number of new tokens (no EOS, so both do the
same work). Prints tokens/s for each and the ratio.
"""

from __future__ import annotations

import argparse

import torch
from common import BENCH_MODEL, build, machine, timed_pair

from persimmon import PersimmonForCausalLM, PersimmonTokenizer
from persimmon.generate import generate
from jobs.corpus import paragraphs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="ours with the engine's compiled decode step")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    hf, path = build("causal")
    hf = hf.to(dtype).eval()
    ours = PersimmonForCausalLM.from_pretrained(path, dtype=dtype)
    tok = PersimmonTokenizer.from_pretrained(path)
    # mixed lengths: 8 to ~250 tokens of real prose
    texts = [p[: 40 + (i * 97) % 1000] for i, p in enumerate(paragraphs()[100 : 100 + args.batch])]
    ids, mask = tok.batch(texts, padding_side="left")
    lengths = mask.sum(-1).tolist()
    new = args.new_tokens

    def run_ours():
        return generate(ours, ids, mask, max_new_tokens=new, eos_token_id=[], compile=args.compile)

    def run_theirs():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               pad_token_id=tok.padding_id, eos_token_id=None)

    out_ours, out_theirs = run_ours(), run_theirs()
    T = ids.shape[1]
    same = sum(out_ours.tokens[i] == out_theirs[i, T:].tolist() for i in range(len(texts)))
    t_ours, t_theirs = timed_pair(run_ours, run_theirs, args.repeats)
    tokens = new * len(texts)
    print(f"model {BENCH_MODEL}, vocab {ours.config.vocab_size}, {args.dtype}, compiled decode {args.compile}; {machine()}")
    print(f"batch {len(texts)}, prompt tokens {min(lengths)}..{max(lengths)} (padded to {T}), {new} new tokens each")
    print(f"rows with identical greedy tokens: {same}/{len(texts)}")
    print(f"ours:         {tokens / t_ours:9.1f} tokens/s  ({t_ours:.3f} s)")
    print(f"transformers: {tokens / t_theirs:9.1f} tokens/s  ({t_theirs:.3f} s)")
    print(f"ratio ours/transformers: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
