"""Demo data built from real text on this machine (nothing downloaded).

`python -m jobs.demo DIR` writes what scripts/demo.sh walks through:
  DIR/base       a small Persimmon causal LM (random weights) with a tokenizer trained on the machine's text;
  DIR/labeled    paragraphs with the `source` they came from (license, docstring, reference): train-head's input;
  DIR/input      other paragraphs of the same sources, to classify (their `source` kept, to score the result).
`build_demo` (the tests' fixture) writes a random-weight classifier to DIR/model and unlabeled shards to DIR/input.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import torch

from persimmon import PersimmonConfig, PersimmonForCausalLM, PersimmonForSequenceClassification

from .corpus import labeled_paragraphs, paragraphs

LABELS = {0: "legal", 1: "technical", 2: "other"}
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=1024)


def build_tokenizer(model_dir: Path, texts: list[str], vocab_size: int) -> tuple[int, int]:
    """Train a sentencepiece Unigram model (byte fallback, |ENDOFTEXT|) into model_dir; returns its size and
    the id of |ENDOFTEXT| (Persimmon's BOS and EOS)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus = model_dir.parent / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(model_dir / "tokenizer"), vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, user_defined_symbols=["|ENDOFTEXT|"], hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=2,
    )
    (model_dir / "tokenizer.vocab").unlink(missing_ok=True)
    pieces = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return pieces.get_piece_size(), pieces.piece_to_id("|ENDOFTEXT|")


def _config(vocab: tuple[int, int], shape: dict | None = None, **extra) -> PersimmonConfig:
    size, end = vocab
    return PersimmonConfig(vocab_size=size, bos_token_id=end, eos_token_id=end, **{**SHAPE, **(shape or {})},
                           **extra)


def build_demo(root: str | Path, shards: int = 4, rows_per_shard: int = 250, vocab_size: int = 2000,
               shape: dict | None = None) -> Path:
    """A random-weight classifier (DIR/model) and unlabeled Parquet shards (DIR/input): the tests' fixture.
    `shape` overrides the model's sizes (SHAPE)."""
    root = Path(root)
    model_dir, input_dir = root / "model", root / "input"
    texts = list(paragraphs())
    vocab = build_tokenizer(model_dir, texts, vocab_size)
    torch.manual_seed(0)
    PersimmonForSequenceClassification(_config(vocab, shape, id2label=LABELS)).save_pretrained(model_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = texts[s * rows_per_shard : (s + 1) * rows_per_shard]
        table = pa.table({"id": list(range(s * rows_per_shard, s * rows_per_shard + len(rows))), "text": rows})
        pq.write_table(table, input_dir / f"part-{s:05d}.parquet", row_group_size=100)
    return root


def build_walkthrough(root: str | Path, per_source: int = 500, labeled_fraction: float = 0.4,
                      vocab_size: int = 2000, shards: int = 4) -> Path:
    """The demo's base model, labeled rows and rows to classify (see the module docstring)."""
    root = Path(root)
    pairs = labeled_paragraphs(per_source)
    random.Random(0).shuffle(pairs)
    vocab = build_tokenizer(root / "base", list(paragraphs()) + [t for t, _ in pairs], vocab_size)
    torch.manual_seed(0)
    PersimmonForCausalLM(_config(vocab)).save_pretrained(root / "base")  # random weights: say so in the output
    cut = int(len(pairs) * labeled_fraction)
    for name, part, count in (("labeled", pairs[:cut], 2), ("input", pairs[cut:], shards)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
        step = -(-len(part) // count)
        for s in range(count):
            rows = part[s * step : (s + 1) * step]
            ids = list(range(s * step, s * step + len(rows)))
            table = pa.table({"id": ids, "text": [t for t, _ in rows], "source": [src for _, src in rows]})
            pq.write_table(table, folder / f"part-{s:05d}.parquet", row_group_size=100)
    # a few rows for the README's extraction example (generation under a schema costs tokens per row)
    tickets = pq.read_table(root / "input" / "part-00000.parquet").slice(0, 24)
    pq.write_table(tickets, root / "tickets.parquet")
    write_requests(root / "requests.jsonl", tickets.column("text").to_pylist()[:6])
    return root


def write_requests(path: Path, texts: list[str]) -> None:
    """An OpenAI batch file for the README's openai-batch example: chat, completion and embedding lines."""
    lines = []
    for i, text in enumerate(texts):
        excerpt = text[:200]
        if i % 3 == 0:
            url, body = "/v1/chat/completions", {"messages": [{"role": "system", "content": "Answer in one line."},
                                                              {"role": "user", "content": f"Summarise: {excerpt}"}],
                                                 "max_tokens": 16, "temperature": 0}
        elif i % 3 == 1:
            url, body = "/v1/completions", {"prompt": excerpt, "max_tokens": 12, "temperature": 0.7, "seed": i}
        else:
            url, body = "/v1/embeddings", {"input": excerpt}
        lines.append(json.dumps({"custom_id": f"ticket-{i}", "method": "POST", "url": url,
                                 "body": {"model": "demo", **body}}))
    path.write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    print(build_walkthrough(sys.argv[1] if len(sys.argv) > 1 else "demo-data"))
