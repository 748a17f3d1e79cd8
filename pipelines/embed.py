"""EmbeddingPipeline: a record batch of texts in, the same rows with `embedding` / `error` out.

The vector is the model's final hidden state (after the final LayerNorm), pooled per row: `last` takes the
last real token, exactly what a PersimmonForSequenceClassification head scores; `mean` averages the real
tokens. Any Persimmon checkpoint works (causal LM or classifier: the heads are not loaded). These are also
the features `persimmon-batch train-head` fits a classifier head on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from persimmon import PersimmonModel

from .batching import (ModelPipeline, checked_options, drop_nonfinite, encode_rows, pad_batch, plan_batches,
                       text_column)
from .options import EmbedOptions, Pooling
from .schema import append_columns, embedding_schema


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling | str) -> torch.Tensor:
    """(B, H) from hidden states (B, T, H) under an attention mask (B, T) of either padding side."""
    real = mask.to(hidden.device).bool()
    if pooling == Pooling.LAST:
        positions = torch.arange(real.shape[1], device=hidden.device)
        last = (positions * real).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == Pooling.MEAN:
        weights = real.to(torch.float32)[..., None]
        return (hidden.float() * weights).sum(1) / weights.sum(1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


class EmbeddingPipeline(ModelPipeline):
    def __init__(
        self,
        model_dir: str | Path,
        options: EmbedOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        text_column: str = "text",
        padding_side: str = "right",
        **overrides,
    ) -> None:
        """options (or the same names as keywords, e.g. pooling="mean", normalize=True): see EmbedOptions."""
        o = checked_options(options or EmbedOptions(), overrides)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._load(model_dir, o, PersimmonModel, device, text_column)
        self.padding_side = padding_side
        self._limit()
        self.schema = embedding_schema(self.config.hidden_size)

    def _encode(self, text: str) -> tuple[list[int], bool]:
        enc = self.tokenizer.encode_truncated(text, self.max_length, self.options.truncation_side)
        return enc.ids, enc.truncated

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, hidden) float32 vectors of a padded batch."""
        hidden = self.model(ids, attention_mask=mask).last_hidden_state
        vectors = pooled(hidden, mask, self.options.pooling).float()
        if self.options.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors

    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        start = time.perf_counter()
        texts, errors = text_column(batch, self.text_column)
        rows = encode_rows(texts, errors, self._encode, self.max_length, self.options.truncation_side)
        size = self.model.config.hidden_size
        flat = np.zeros((len(texts), size), dtype=np.float32)
        filled = np.zeros(len(texts), dtype=bool)
        for group in plan_batches(rows, self.options.batch_tokens):
            self._report(len(group))
            ids, mask = pad_batch(self.tokenizer, group, self.padding_side, self.stats.padding, self.device)
            group, values = drop_nonfinite(group, self.embed(ids, mask), errors, self.stats)
            index = [row.index for row in group]
            flat[index] = values.cpu().numpy()
            filled[index] = True
        self.stats.record(errors, rows, time.perf_counter() - start)
        self._report(len(texts) - len(rows))  # rows that never reached the model
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size, mask=pa.array(~filled))
        return append_columns(batch, self.schema, {"embedding": vectors}, errors)

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        """Each input batch's output table, in order (the interface the runner's workers use)."""
        for batch in batches:
            yield self(batch)
