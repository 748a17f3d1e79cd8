"""Embedding throughput: the embed pipeline against classification on the same checkpoint (the same forward
pass: `last` pooling is what the classifier head scores), and against transformers.

    .venv/bin/python bench/bench_embed.py [--rows 1000] [--max-length 512]

Model: hidden 512, 6 layers, 8 heads, intermediate 2048, 4 labels, random weights; real-text rows. Each side
runs over the same rows in 1024-row record batches, alternately (median of 3), fp32 and bf16. The reference
is what a transformers user writes for embeddings: PersimmonModel in batches of 32, right-padded, the last
real token's hidden state.
"""

from __future__ import annotations

import argparse

import pyarrow as pa
import torch
from common import build, machine, timed_pair

from jobs.corpus import paragraphs
from persimmon import PersimmonTokenizer
from pipelines import ClassificationPipeline, EmbeddingPipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    hf, path = build("seqcls", num_labels=4, pad_token_id=None)
    tok = PersimmonTokenizer.from_pretrained(path)
    texts = list(paragraphs()[: args.rows])
    table = pa.table({"text": texts})

    def over(pipe):
        return lambda: [pipe(table.slice(i, 1024)) for i in range(0, len(texts), 1024)]

    def reference():
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 32):
                ids, mask = tok.batch(texts[i:i + 32], padding_side="right", max_length=args.max_length)
                hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
                out.append(hidden[torch.arange(len(ids)), mask.sum(1) - 1])
        return out

    print(f"hidden 512, 6 layers; {len(texts)} rows; {machine()}")
    for dtype in ("float32", "bfloat16"):
        embed = EmbeddingPipeline(path, dtype=dtype, max_length=args.max_length)
        classify = ClassificationPipeline(path, dtype=dtype, max_length=args.max_length)
        t_embed, t_classify = timed_pair(over(embed), over(classify), repeats=3)
        print(f"{dtype}: embed {len(texts) / t_embed:7.1f} rows/s, classify {len(texts) / t_classify:7.1f} rows/s; "
              f"embed / classify throughput {t_classify / t_embed:.3f}")
    hf.float()
    embed = EmbeddingPipeline(path, dtype="float32", max_length=args.max_length)
    t_embed, t_ref = timed_pair(over(embed), reference, repeats=3)
    print(f"float32: embed {len(texts) / t_embed:7.1f} rows/s, transformers (batches of 32) {len(texts) / t_ref:7.1f} "
          f"rows/s; ours / transformers {t_ref / t_embed:.2f}x")


if __name__ == "__main__":
    main()
