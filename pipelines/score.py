"""ScorePipeline: a record batch of texts in, each row's log-likelihood under a causal LM out.

`logprob` is the sum of log p(token | the tokens before it) over the row's tokens after BOS (float64),
`tokens` how many were scored, `perplexity` exp(-logprob / tokens). With a prompt template only the text's
own tokens are scored: the template's tokens before and after it are context, not counted. One prefill per
row, batched like classification (right padding, length-sorted batches within --batch-tokens); the
vocabulary projection runs in slices of positions, so a 262k vocabulary never holds (tokens x vocab) logits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM

from .batching import (EncodedRow, ModelPipeline, checked_options, encode_rows, finite, pad_batch, plan_batches,
                       text_column)
from .options import ScoreOptions
from .prompts import PromptTemplate
from .schema import SCORE, append_columns

LOGIT_ELEMENTS = 1 << 25  # logits computed at once (positions x vocabulary): 128 MiB of float32
NOTHING_TO_SCORE = "nothing to score: the text has no tokens after BOS"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ScorePipeline(ModelPipeline):
    def __init__(self, model_dir: str | Path, options: ScoreOptions | None = None, *,
                 device: str | torch.device = "cpu", text_column: str = "text", **overrides) -> None:
        """options (or the same names as keywords): see ScoreOptions. Texts longer than max_length tokens
        (default: the model's window) lose their end (truncation_side right) and are scored as kept."""
        o = checked_options(options or ScoreOptions(), overrides)
        self._load(model_dir, o, PersimmonForCausalLM, device, text_column)
        self._limit()
        self.template = PromptTemplate(o.prompt_template) if o.prompt_template else None
        if self.template is not None:
            self.template.check_fits(self.tokenizer, self.max_length)
            self.prefix_ids = self.tokenizer.encode(self.template.prefix)
            self.empty_ids = self.tokenizer.encode(self.template.render(""))
        self.schema = SCORE

    def _encode(self, text: str) -> tuple[list[int], bool]:
        if self.template is not None:
            return self.template.encode(self.tokenizer, text, self.max_length, self.options.truncation_side)
        enc = self.tokenizer.encode_truncated(text, self.max_length, self.options.truncation_side)
        return enc.ids, enc.truncated

    def _span(self, ids: list[int]) -> tuple[int, int]:
        """The positions [start, end) of the tokens to score: after BOS, or the text's own inside a template
        (after the tokens it shares with the template's prefix, before those it shares with its end)."""
        if self.template is None:
            return 1, len(ids)
        start = max(1, _common_prefix(ids, self.prefix_ids))
        tail = _common_prefix(ids[::-1], self.empty_ids[::-1]) if self.template.suffix else 0
        return start, max(start, len(ids) - tail)

    @torch.inference_mode()
    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        began = time.perf_counter()
        texts, errors = text_column(batch, self.text_column)
        rows = encode_rows(texts, errors, self._encode, self.max_length, self.options.truncation_side)
        n = len(texts)
        columns: dict[str, list] = {name: [None] * n for name in self.schema.names}
        scorable = []
        for row in rows:
            start, end = self._span(row.ids)
            if end <= start:
                errors[row.index] = NOTHING_TO_SCORE
            else:
                scorable.append((row, start, end))
        spans = {row.index: (start, end) for row, start, end in scorable}
        for group in plan_batches([r for r, _, _ in scorable], self.options.batch_tokens):
            self._report(len(group))
            for row, total in zip(group, self._logprobs(group, [spans[r.index] for r in group])):
                start, end = spans[row.index]
                if not finite(total):
                    self.stats.nonfinite_row(errors, row.index)
                    continue
                count = end - start
                columns["logprob"][row.index] = total
                columns["tokens"][row.index] = count
                columns["perplexity"][row.index] = math.exp(-total / count)
        self.stats.record(errors, rows, time.perf_counter() - began)
        self._report(n - len(scorable))
        return append_columns(batch, self.schema, columns, errors)

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        for batch in batches:
            yield self(batch)

    def _logprobs(self, group: list[EncodedRow], spans: list[tuple[int, int]]) -> list[float]:
        """Each row's summed log-probability of its tokens in [start, end), in float64."""
        ids, mask = pad_batch(self.tokenizer, group, "right", self.stats.padding, self.device)
        hidden = self.model.model(ids, attention_mask=mask).last_hidden_state  # (B, T, C)
        rows = torch.cat([torch.full((e - s,), i, dtype=torch.long) for i, (s, e) in enumerate(spans)])
        targets = torch.cat([torch.arange(s, e) for s, e in spans])
        rows, targets = rows.to(self.device), targets.to(self.device)
        # position t - 1 predicts token t
        states = hidden[rows, targets - 1]
        wanted = ids[rows, targets]
        step = max(1, LOGIT_ELEMENTS // self.model.config.vocab_size)
        parts = []
        for i in range(0, len(states), step):
            logits = self.model.lm_head(states[i : i + step]).float()
            parts.append(torch.log_softmax(logits, dim=-1).gather(1, wanted[i : i + step, None])[:, 0])
        per_token = torch.cat(parts).double()
        totals = torch.zeros(len(group), dtype=torch.float64, device=self.device).index_add_(0, rows, per_token)
        return totals.tolist()
