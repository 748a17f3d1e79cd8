"""The pipeline around the engine: lines parsed (requests.py), generation lines fed to the continuous-batching
engine as rows, embeddings lines run through the base model, each finished line's record written
(responses.py), one output table per input batch, in input order."""

from __future__ import annotations

import collections
import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM
from persimmon.engine import GenerationEngine, Request
from persimmon.sampling import FinishReason

from ..batching import (NONFINITE, EncodedRow, ModelPipeline, checked_options, engine_stream, finite, pad_batch,
                        plan_batches)
from ..embed import pooled
from ..options import BatchAPIOptions
from .requests import Endpoint, ErrorCode, Line, RequestParser
from .responses import Responses

OUTPUT = pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("ok", pa.bool_()), ("record", pa.string())])


@dataclass(eq=False)
class _Batch:
    lines: list[Line]
    left: int


class OpenAIBatchPipeline(ModelPipeline):
    def __init__(self, model_dir: str | Path, options: BatchAPIOptions | None = None, *,
                 device: str | torch.device = "cpu", text_column: str | None = None, **overrides) -> None:
        o = checked_options(options or BatchAPIOptions(), overrides)
        self._load(model_dir, o, PersimmonForCausalLM, device, text_column)
        self.window = self.config.max_position_embeddings
        self.vocabulary = None
        self.engine = GenerationEngine(
            self.model, o.max_new_tokens, decode=self.tokenizer.decode, kv_cache_bytes=o.kv_cache_bytes,
            prefill_tokens=o.batch_tokens, vocab_limit=self.tokenizer.vocab_size,
            pad_token_id=self.tokenizer.padding_id, compile=o.compile)
        self.schema = OUTPUT
        self.parser = RequestParser(self.tokenizer, o, self.window)
        self.responses = Responses(Path(model_dir).name)

    # -- the interface the runner's workers use -----------------------------------------------------------
    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        return next(iter(self.stream([batch])))

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        """Each input batch's output table, in input order (one stream is one file: custom_ids are unique
        within it)."""
        self.engine.reset()
        self.parser.reset()

        def finish(entry: _Batch, seconds: float) -> pa.Table:
            self.stats.rows += len(entry.lines)
            self.stats.errors += sum(not line.ok for line in entry.lines)
            self.stats.seconds += seconds
            return pa.table([pa.array([x.number for x in entry.lines], pa.int64()),
                             pa.array([x.custom_id for x in entry.lines], pa.string()),
                             pa.array([x.ok for x in entry.lines], pa.bool_()),
                             pa.array([x.record for x in entry.lines], pa.string())], schema=OUTPUT)

        def drain(done) -> None:
            for c in done:
                entry, line, key = c.key
                line.completions[key] = c
                line.left -= 1
                self.stats.generated_tokens += len(c.tokens)
                if line.left == 0:
                    self._finish(line)
                    entry.left -= 1
                    self._report(1)

        yield from engine_stream(self.engine, batches, self._enqueue, drain, finish, self._beat)

    # -- lines in ------------------------------------------------------------------------------------------
    def _enqueue(self, batch: pa.RecordBatch | pa.Table) -> _Batch:
        numbers = batch.column("line").to_pylist() if "line" in batch.schema.names else list(range(1, batch.num_rows + 1))
        raws = batch.column("request").to_pylist()
        lines = [self._parse(number, raw) for number, raw in zip(numbers, raws)]
        entry = _Batch(lines, 0)
        embeddings = [line for line in lines if line.record is None and line.kind == Endpoint.EMBEDDING]
        if embeddings:
            self._embed(embeddings)
        immediate = 0
        for line in lines:
            if line.record is not None:
                immediate += 1
                continue
            self._add(entry, line)
        self._report(immediate)
        return entry

    def _parse(self, number: int, raw: bytes | str | None) -> Line:
        line = self.parser.parse(number, raw)
        if line.error is not None:
            self.responses.error(line, *line.error)
        elif line.needs_vocabulary and self.vocabulary is None:
            from persimmon.grammar import vocabulary_for

            self.vocabulary = vocabulary_for(self.tokenizer, self.config.vocab_size)
            self.engine.vocabulary = self.responses.vocabulary = self.vocabulary
        return line

    def _add(self, entry: _Batch, line: Line) -> None:
        entry.left += 1
        line.left = len(line.prompts) * line.n
        if line.params.seed is None and not line.params.greedy:
            # unseeded: a stream of the line's own, so two identical lines are two independent draws
            line.params = dataclasses.replace(line.params, seed=secrets.randbits(63))
        for p, ids in enumerate(line.prompts):
            for choice in range(line.n):  # choice 0 samples as `generate` would the same prompt and seed
                key = None if choice == 0 else np.asarray(ids, "<i8").tobytes() + f"#{choice}".encode()
                self.engine.add(Request((entry, line, (p, choice)), ids, line.params, seed_key=key))

    # -- records out -----------------------------------------------------------------------------------------
    def _nonfinite(self, line: Line) -> None:
        """The line's model output was not finite (pipelines.batching.finite): its error, counted."""
        self.stats.nonfinite += 1
        self.responses.error(line, ErrorCode.MODEL_ERROR, NONFINITE)

    def _finish(self, line: Line) -> None:
        if any(c.finish_reason == FinishReason.NONFINITE for c in line.completions.values()):
            self._nonfinite(line)
        else:
            self.responses.completion(line)

    @torch.inference_mode()
    def _embed(self, lines: list[Line]) -> None:
        rows, owners = [], []
        for line in lines:
            for i, ids in enumerate(line.prompts):
                rows.append(EncodedRow(len(rows), ids, False))
                owners.append((line, i))
        vectors: list[np.ndarray | None] = [None] * len(rows)
        for group in plan_batches(rows, self.options.batch_tokens):
            ids, mask = pad_batch(self.tokenizer, group, "right", self.stats.padding, self.device)
            hidden = self.model.model(ids, attention_mask=mask).last_hidden_state
            out = pooled(hidden, mask, self.options.pooling).float()
            if self.options.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
            for row, vector in zip(group, out.cpu().numpy()):
                vectors[row.index] = vector
        per_line: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        for (line, _), vector in zip(owners, vectors):
            per_line[id(line)].append(vector)
        for line in lines:
            found = per_line[id(line)]
            if not all(finite(v) for v in found):
                self._nonfinite(line)
            else:
                self.responses.embeddings(line, found)
