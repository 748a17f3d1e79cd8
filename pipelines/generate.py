"""GenerationPipeline: a record batch of texts in, the same rows with completion / finish_reason / token counts.

Each text is put into the prompt template and goes through one continuous-batching engine
(persimmon.engine): rows take KV-cache slots as others finish, the template's text before `{text}` is
prefilled once, and a stream of record batches flows through without draining the batch between them.
Sampling is seeded per row by its prompt, so a rerun reproduces every completion whatever the batching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM, SamplingParams
from persimmon.engine import GenerationEngine, Request
from persimmon.sampling import FinishReason

from .batching import (ModelPipeline, checked_options, encode_rows, engine_stream, text_column)
from .options import GenerateOptions
from .prompts import PromptTemplate
from .schema import append_columns, generation_schema, parsed_type


class GenerationPipeline(ModelPipeline):
    def __init__(
        self,
        model_dir: str | Path,
        options: GenerateOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        text_column: str = "text",
        sampling: SamplingParams | None = None,
        **overrides,
    ) -> None:
        """options (or the same names as keywords, e.g. max_new_tokens=64, stop=["\\n"]): see GenerateOptions;
        `sampling` replaces its temperature / top_k / top_p / seed. max_length: prompt tokens per row (default
        and cap: the model window minus max_new_tokens); longer prompts lose text on truncation_side (left
        keeps the end of the text, next to the answer)."""
        if sampling is not None:
            overrides.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                             seed=sampling.seed)
        o = checked_options(options or GenerateOptions(), overrides)
        self._load(model_dir, o, PersimmonForCausalLM, device, text_column)
        self.template = PromptTemplate(o.prompt_template)
        self.max_new_tokens = max_new_tokens = o.max_new_tokens
        self.sampling = o.sampling
        self.truncation_side = o.truncation_side
        self.batch_tokens, self.compile = o.batch_tokens, o.compile
        self.template.check_fits(self.tokenizer, self._limit())  # the window less max_new_tokens
        self.grammar = self.sampling.grammar
        self.vocabulary = None
        if self.grammar is not None or o.logprobs is not None:
            from persimmon.grammar import vocabulary_for

            self.vocabulary = vocabulary_for(self.tokenizer, self.config.vocab_size)
        # `parsed`: the completion under --json-schema as a typed value, when the schema maps to Arrow
        self.parsed_type = parsed_type(self.grammar.schema) if self.grammar is not None else None
        self.schema = generation_schema(self.parsed_type, o.logprobs is not None)
        prefix = self.tokenizer.encode(self.template.prefix)[:-1]  # its last piece may merge with the text
        self.engine = GenerationEngine(
            self.model, max_new_tokens, sampling=self.sampling, decode=self.tokenizer.decode,
            kv_cache_bytes=o.kv_cache_bytes, prefill_tokens=o.batch_tokens, prefix_ids=prefix, vocab_limit=self.tokenizer.vocab_size,
            pad_token_id=self.tokenizer.padding_id, compile=o.compile, vocabulary=self.vocabulary)
        self._counted = (0, 0, 0)

    def _encode(self, text: str) -> tuple[list[int], bool]:
        return self.template.encode(self.tokenizer, text, self.max_length, self.truncation_side)

    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """One record batch's output (for a stream of batches, `stream` keeps the engine full across them)."""
        return next(iter(self.stream([batch])))

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        """Each input batch's output table, in input order. Rows of every batch go through one engine: the
        next batch is read as soon as the engine has taken every waiting row into a slot, so one batch's
        tail overlaps the next one's start. Memory: the engine's slots plus the batches still in flight."""
        self.engine.reset()  # whatever an interrupted stream left behind

        def finish(entry: "_InFlight", seconds: float) -> pa.Table:
            self.stats.record(entry.errors, entry.rows, seconds)
            return append_columns(entry.batch, self.schema, entry.columns, entry.errors)

        def drain(completions) -> None:
            self._report(len(completions))
            for c in completions:
                entry, index = c.key
                entry.left -= 1
                if c.finish_reason == FinishReason.NONFINITE:  # the engine found the row's logits not finite
                    self.stats.nonfinite_row(entry.errors, index)
                    continue
                entry.columns["completion"][index] = c.text
                entry.columns["finish_reason"][index] = c.finish_reason.value
                entry.columns["prompt_tokens"][index] = c.prompt_tokens
                entry.columns["completion_tokens"][index] = len(c.tokens)
                if c.error is not None:  # e.g. cut by max_new_tokens before the grammar completed
                    entry.errors[index] = c.error
                if self.parsed_type is not None and c.error is None:
                    entry.columns["parsed"][index] = json.loads(c.text)
                if c.logprobs is not None:
                    entry.columns["logprobs"][index] = [self._logprob(t) for t in c.logprobs]
                self.stats.generated_tokens += len(c.tokens)
            self._count_prefill()

        yield from engine_stream(self.engine, batches, self._enqueue, drain, finish, self._beat)

    def _enqueue(self, batch: pa.RecordBatch | pa.Table) -> "_InFlight":
        texts, errors = text_column(batch, self.text_column)
        rows = encode_rows(texts, errors, self._encode, self.max_length, self.truncation_side)
        entry = _InFlight(batch, errors, rows, {name: [None] * len(texts) for name in self.schema.names}, len(rows))
        self._report(len(texts) - len(rows))  # rows that never reach the model
        for row in rows:
            self.engine.add(Request((entry, row.index), row.ids))
        return entry

    def _logprob(self, t) -> dict:
        text = self.vocabulary.text
        return {"token": text(t.id), "id": t.id, "logprob": t.logprob,
                "top_logprobs": [{"token": text(i), "id": i, "logprob": lp} for i, lp in t.top]}

    def _count_prefill(self) -> None:
        """Prefill tokens (real and padded) from the engine's counters, into the pipeline's padding stats."""
        now = tuple(self.engine.counters[k] for k in ("prefill_tokens", "prefill_padded_tokens", "prefill_batches"))
        padding = self.stats.padding
        padding.real_tokens += now[0] - self._counted[0]
        padding.padded_tokens += now[1] - self._counted[1]
        padding.batches += now[2] - self._counted[2]
        self._counted = now


@dataclass(eq=False)
class _InFlight:
    """A record batch whose rows are in the engine: its output columns fill in as rows finish."""

    batch: pa.RecordBatch | pa.Table
    errors: list[str | None]
    rows: list
    columns: dict[str, list]
    left: int  # rows not finished yet
