"""Shared by the benchmarks: a real-text tokenizer and a random Persimmon model saved by transformers."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the benchmark model: hidden 512, 6 layers, 8 heads, intermediate 2048
BENCH_MODEL = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                   max_position_embeddings=2048)


def build(kind: str = "causal", vocab_size: int = 8000, workdir: str | None = None, **overrides):
    """(transformers model, our checkpoint dir, tokenizer path) for the bench model and a real-text tokenizer."""
    from tests.conftest import build_hf_model, train_sentencepiece

    root = Path(workdir or tempfile.mkdtemp(prefix="persimmon-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    spm_model = train_sentencepiece(root / "tokenizer", vocab_size=vocab_size)
    import sentencepiece as spm

    real_vocab = spm.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    hf = build_hf_model(root / "model", kind, vocab_size=real_vocab, **{**BENCH_MODEL, **overrides})
    (root / "model" / "tokenizer.model").write_bytes(spm_model.read_bytes())
    return hf, root / "model"


def timed_pair(a, b, repeats: int = 5) -> tuple[float, float]:
    """Median wall times of a() and b(), each warmed up once, then run alternately so that drift in the
    machine's speed (other tenants, frequency) falls on both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def machine() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus"
