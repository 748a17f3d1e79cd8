"""The demo: a small Persimmon classifier, a tokenizer and a Parquet dataset, all built from real text on
this machine (nothing downloaded). `python -m jobs.demo DIR` writes DIR/model and DIR/input."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import torch

from persimmon import PersimmonConfig, PersimmonForSequenceClassification

from .corpus import paragraphs

LABELS = {0: "legal", 1: "technical", 2: "other"}


def build_demo(root: str | Path, shards: int = 4, rows_per_shard: int = 250, vocab_size: int = 2000) -> Path:
    root = Path(root)
    model_dir, input_dir = root / "model", root / "input"
    model_dir.mkdir(parents=True, exist_ok=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    texts = list(paragraphs())
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(model_dir / "tokenizer"), vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, user_defined_symbols=["|ENDOFTEXT|"], hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=2,
    )
    (model_dir / "tokenizer.vocab").unlink(missing_ok=True)
    vocab = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    end = vocab.piece_to_id("|ENDOFTEXT|")
    torch.manual_seed(0)
    config = PersimmonConfig(vocab_size=vocab.get_piece_size(), hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024,
                             bos_token_id=end, eos_token_id=end, id2label=LABELS)
    PersimmonForSequenceClassification(config).save_pretrained(model_dir)  # random weights: a pipeline demo
    for s in range(shards):
        rows = texts[s * rows_per_shard : (s + 1) * rows_per_shard]
        table = pa.table({"id": list(range(s * rows_per_shard, s * rows_per_shard + len(rows))), "text": rows})
        pq.write_table(table, input_dir / f"part-{s:05d}.parquet", row_group_size=100)
    return root


if __name__ == "__main__":
    print(build_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-data"))
