"""Classification throughput: our pipeline against transformers' PersimmonForSequenceClassification.

    .venv/bin/python bench/bench_classify.py [--rows 2000] [--max-length 512]

Same model (hidden 512, 6 layers, 8 heads, intermediate 2048, 4 labels) and the same real-text rows (license
texts and Python docstrings: 1 to several hundred tokens). The reference runs as a user would write it:
batches of 32 in input order, right-padded, fp32. Ours: the pipeline over 1024-row record batches, fp32, and
again in bf16. The rows are split in chunks processed alternately by each side, so drift in the machine's
speed falls on both. Also prints model FLOPs achieved as a fraction of this machine's measured matmul peak.
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa
import torch
from common import BENCH_MODEL, build, machine

from persimmon import PersimmonTokenizer
from pipelines import ClassificationPipeline
from jobs.corpus import paragraphs


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def model_flops(lengths: list[int], hidden: int, layers: int, intermediate: int) -> float:
    """Forward FLOPs for these real token counts: 2 x weights per token plus causal attention scores/values."""
    per_token = 2 * layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return sum(per_token * n + 2 * layers * n * n * hidden for n in lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()

    hf, path = build("seqcls", num_labels=4, pad_token_id=None)
    hf = hf.eval()
    tok = PersimmonTokenizer.from_pretrained(path)
    texts = list(paragraphs()[: args.rows])
    lengths = [len(tok.encode_truncated(t, args.max_length).ids) for t in texts]
    # what a user of transformers writes: a pad id (the real checkpoints have none), batches of 32 in order
    hf.config.pad_token_id = tok.padding_id

    def reference(chunk: list[str]) -> list[list[float]]:
        probs = []
        with torch.inference_mode():
            for i in range(0, len(chunk), 32):
                ids, mask = tok.batch(chunk[i : i + 32], padding_side="right", max_length=args.max_length)
                probs += torch.softmax(hf(ids, attention_mask=mask).logits.float(), -1).tolist()
        return probs

    def ours_with(pipe: ClassificationPipeline):
        def run(chunk: list[str]) -> list[list[float]]:
            probs = []
            for i in range(0, len(chunk), 1024):
                probs += pipe(pa.table({"text": chunk[i : i + 1024]})).column("probs").to_pylist()
            return probs
        return run

    fp32 = ClassificationPipeline(path, dtype="float32", max_length=args.max_length)
    bf16 = ClassificationPipeline(path, dtype="bfloat16", max_length=args.max_length)
    sides = {"transformers fp32": reference, "ours fp32": ours_with(fp32), "ours bf16": ours_with(bf16)}
    warm = texts[:64]
    for run in sides.values():
        run(warm)
    fp32.stats.padding.__init__()
    times = dict.fromkeys(sides, 0.0)
    results: dict[str, list] = {name: [] for name in sides}
    size = -(-len(texts) // args.chunks)
    for c in range(args.chunks):
        chunk = texts[c * size : (c + 1) * size]
        for name, run in sides.items():
            start = time.perf_counter()
            results[name] += run(chunk)
            times[name] += time.perf_counter() - start

    ref = torch.tensor(results["transformers fp32"])
    mine = torch.tensor(results["ours fp32"])
    low = torch.tensor(results["ours bf16"])
    flops = model_flops(lengths, BENCH_MODEL["hidden_size"], BENCH_MODEL["num_hidden_layers"],
                        BENCH_MODEL["intermediate_size"])
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"model {BENCH_MODEL}, 4 labels, vocab {tok.vocab_size}; {machine()}")
    print(f"{len(texts)} rows, {sum(lengths)} real tokens (1..{max(lengths)} per row, max_length {args.max_length})")
    print(f"ours fp32 vs transformers: max |prob diff| {(mine - ref).abs().max():.2e}, "
          f"labels agree {(mine.argmax(-1) == ref.argmax(-1)).float().mean():.4f}; "
          f"ours bf16 labels agree {(low.argmax(-1) == ref.argmax(-1)).float().mean():.4f}")
    print(f"ours fp32 padding waste {fp32.stats.padding.waste:.3f} (padded / real tokens)")
    for name, seconds in times.items():
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        print(f"{name:18s} {len(texts) / seconds:8.1f} rows/s  {seconds:7.2f} s  "
              f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:.1%} of {peak / 1e9:.0f} GFLOP/s matmul peak")
    print(f"ratio ours fp32 / transformers fp32: {times['transformers fp32'] / times['ours fp32']:.2f}x")
    print(f"ratio ours bf16 / transformers fp32: {times['transformers fp32'] / times['ours bf16']:.2f}x")


if __name__ == "__main__":
    main()
