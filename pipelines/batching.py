"""Turning a record batch's text column into model batches that waste little.

Rows are validated one by one (a bad row gets an error and keeps its place), encoded and truncated, then
sorted by token length and cut into batches by a token budget counted in padded tokens. Results are
scattered back to the input order by the caller. PaddingStats keeps the real and padded token counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from persimmon import PersimmonConfig, PersimmonTokenizer
from persimmon.scheduler import length_groups

from .errors import one_line
from .schema import INPUT_ERROR, MAX_CHARS_PER_TOKEN, is_text_type, missing_text_column



@dataclass
class EncodedRow:
    """A row ready for the model: its position in the record batch, its ids, whether they were truncated."""

    index: int
    ids: list[int]
    truncated: bool


@dataclass
class PaddingStats:
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0

    def add(self, rows: int, width: int, real: int) -> None:
        self.real_tokens += real
        self.padded_tokens += rows * width
        self.batches += 1

    @property
    def waste(self) -> float:
        """Padded tokens per real token (1.0 = no padding)."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


@dataclass
class PipelineStats:
    """Counters a pipeline keeps over every batch it has processed."""

    rows: int = 0
    errors: int = 0
    truncated: int = 0
    seconds: float = 0.0
    padding: PaddingStats = field(default_factory=PaddingStats)
    generated_tokens: int = 0
    nonfinite: int = 0  # rows whose scores or logits were NaN or infinite (error rows)

    def record(self, errors: list[str | None], rows: list[EncodedRow], seconds: float) -> None:
        """Count one processed record batch: its rows, the errors among them, the truncated ones, the time."""
        self.rows += len(errors)
        self.errors += sum(e is not None for e in errors)
        self.truncated += sum(r.truncated for r in rows)
        self.seconds += seconds

    def nonfinite_row(self, errors: list[str | None], index: int) -> None:
        """Row `index` got non-finite model output (see `finite`): an error row, counted."""
        errors[index] = NONFINITE
        self.nonfinite += 1

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "errors": self.errors, "truncated": self.truncated,
            "seconds": round(self.seconds, 3), "real_tokens": self.padding.real_tokens,
            "padded_tokens": self.padding.padded_tokens, "padding_waste": round(self.padding.waste, 4),
            "batches": self.padding.batches, "generated_tokens": self.generated_tokens,
            "nonfinite": self.nonfinite,
        }


def text_column(batch: pa.RecordBatch | pa.Table, name: str) -> tuple[list[str | None], list[str | None]]:
    """The column's values as Python strings, and per row an error message or None.

    A missing column is an error of the whole batch (ValueError); a column that is not text makes every
    row an error row; null, empty and whitespace-only texts are row errors.
    """
    problem = missing_text_column(name, batch.schema.names)
    if problem:
        raise ValueError(problem)
    texts, errors = _texts(batch, name)
    if INPUT_ERROR in batch.schema.names:  # a row its reader could not read as it is
        for i, problem in enumerate(batch.column(INPUT_ERROR).to_pylist()):
            if problem is not None:
                texts[i], errors[i] = None, problem
    return texts, errors


def _texts(batch: pa.RecordBatch | pa.Table, name: str) -> tuple[list[str | None], list[str | None]]:
    column = batch.column(name)
    kind = column.type
    if not is_text_type(kind):
        message = f"text column {name!r} holds {kind}, not strings"
        return [None] * len(column), [message] * len(column)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        values = []
        for raw in column.to_pylist():
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                values.append(exc)  # reported below
    else:
        values = column.to_pylist()
    texts: list[str | None] = []
    errors: list[str | None] = []
    for value in values:
        if isinstance(value, UnicodeDecodeError):
            texts.append(None)
            errors.append(f"text is not valid UTF-8: {value}")
        elif value is None:
            texts.append(None)
            errors.append("text is null")
        elif not value.strip():
            texts.append(None)
            errors.append("text is empty" if not value else "text is only whitespace")
        else:
            texts.append(value)
            errors.append(None)
    return texts, errors


def encode_rows(
    texts: list[str | None],
    errors: list[str | None],
    encode: Callable[[str], tuple[list[int], bool]],
    max_length: int,
    truncation_side: str,
) -> list[EncodedRow]:
    """Encode every valid row; a row whose encoding fails gets its error set in `errors` (in place).

    Very long texts are cut to MAX_CHARS_PER_TOKEN * max_length characters (on the side that truncation
    drops) before encoding, so a 100 MB cell costs no more than a cell at the window's size.
    """
    limit = MAX_CHARS_PER_TOKEN * max_length
    rows: list[EncodedRow] = []
    for index, text in enumerate(texts):
        if text is None:
            continue
        clipped = len(text) > limit
        if clipped:
            text = text[:limit] if truncation_side == "right" else text[-limit:]
        try:
            ids, truncated = encode(text)
        except Exception as exc:  # a row the tokenizer cannot take is that row's error, not the batch's
            errors[index] = f"cannot tokenize text: {one_line(exc, 300, with_type=True)}"
            continue
        if not ids:
            errors[index] = "text has no tokens"
            continue
        rows.append(EncodedRow(index, ids, truncated or clipped))
    return rows


def plan_batches(rows: list[EncodedRow], batch_tokens: int, extra_per_row: int = 0, max_rows: int | None = None,
                 max_waste: float = 0.1, min_tokens: int = 512) -> list[list[EncodedRow]]:
    """Sort rows by length and cut them into batches whose padded size, rows x (longest + extra_per_row),
    stays within batch_tokens (a row longer than the budget gets a batch of its own).

    A batch that already holds min_tokens is also closed when the next row would push its padding past
    max_waste (padded / real - 1): matmul efficiency depends on the tokens in a batch, not its row count,
    so short rows lose nothing by going in batches of their own length.
    extra_per_row is room each row needs beyond its prompt (generated tokens occupy the KV cache too).
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    ordered = sorted(rows, key=lambda r: len(r.ids))
    sizes = [len(row.ids) + extra_per_row for row in ordered]
    return [ordered[a:b] for a, b in length_groups(sizes, batch_tokens, max_waste, min_tokens, max_rows)]


# The one non-finite rule: a row any of whose model outputs (scores, logits, log-probabilities, embedding) is NaN
# or infinite is an error row with this message, counted in PipelineStats.nonfinite (the run warns of it). A NaN
# weight (a corrupt checkpoint) or a dtype that overflows must not turn into confident-looking output.
NONFINITE = "model produced non-finite scores"


def finite(values) -> bool:
    """Whether one row's output (a number, a numpy array or a tensor) is all finite."""
    if isinstance(values, torch.Tensor):
        return bool(torch.isfinite(values).all())
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


def drop_nonfinite(group: list[EncodedRow], scores: torch.Tensor, errors: list[str | None],
                   stats: PipelineStats) -> tuple[list[EncodedRow], torch.Tensor]:
    """The rows whose scores are all finite, and their scores; the others become error rows."""
    keep_rows = torch.isfinite(scores).all(dim=-1)
    if bool(keep_rows.all()):
        return group, scores
    keep = keep_rows.tolist()
    for row, ok in zip(group, keep):
        if not ok:
            stats.nonfinite_row(errors, row.index)
    return [row for row, ok in zip(group, keep) if ok], scores[keep_rows]


def pad_batch(tok: PersimmonTokenizer, group: list[EncodedRow], side: str, stats: PaddingStats,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a planned batch on `device`, its real and padded tokens counted."""
    ids, mask = tok.pad([r.ids for r in group], side)
    stats.add(len(group), ids.shape[1], sum(len(r.ids) for r in group))
    return ids.to(device), mask.to(device)


def load_model(cls, model_dir, dtype: str, device: torch.device):
    """How every pipeline loads its model: the checkpoint in the asked dtype on the device, then fitted to the
    CPU it runs on (bf16 linear layers and attention computed in fp32 where the CPU has no bf16 units:
    persimmon.cpu)."""
    from persimmon.cpu import compute_bf16_linears_in_fp32

    model = cls.from_pretrained(model_dir, dtype=dtype, device=device)
    compute_bf16_linears_in_fp32(model)
    return model


def check_vocabulary(tok: PersimmonTokenizer, config: PersimmonConfig) -> None:
    """A tokenizer with more pieces than the model has embeddings would index past the embedding table."""
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but the model only {config.vocab_size}")


class ReportsRows:
    """Pipelines call `on_rows(n)` as rows finish (each model batch; generation: each finished row), and
    `on_progress()` after each engine step (tokens were made, though no row may have finished: a long row is
    not a stalled one), for live progress; None: nobody listens."""

    on_rows: Callable[[int], None] | None = None
    on_progress: Callable[[], None] | None = None

    def _report(self, rows: int) -> None:
        if self.on_rows is not None and rows:
            self.on_rows(rows)

    def _beat(self) -> None:
        if self.on_progress is not None:
            self.on_progress()


def engine_stream(engine, batches, enqueue, drain, finish, beat=None):
    """Record batches through a continuous-batching engine, each batch's output in input order. enqueue(batch)
    adds its rows to the engine and returns an entry whose `left` counts rows not finished; drain(completions)
    takes what a step finished; finish(entry, seconds) is the entry's output table (seconds since the last one).
    The next batch is read as soon as the engine has taken every waiting row into a slot, so one batch's tail
    overlaps the next one's start. beat() is called after every engine step."""
    import collections
    import time

    pending = collections.deque()
    clock = [time.perf_counter()]

    def ready():
        while pending and pending[0].left == 0:
            entry = pending.popleft()
            now = time.perf_counter()
            yield finish(entry, now - clock[0])
            clock[0] = now

    def step():
        drain(engine.step())
        if beat is not None:
            beat()

    for batch in batches:
        pending.append(enqueue(batch))
        yield from ready()
        while engine.waiting:  # keep stepping until every queued row holds a slot
            step()
            yield from ready()
    while engine.busy:
        step()
        yield from ready()
    yield from ready()


def checked_options(options, overrides: dict):
    """A task's options with keyword overrides (`dtype="bfloat16"`), checked (ValueError lists each problem)."""
    options = dataclasses.replace(options, **overrides)
    options.check()
    return options


class ModelPipeline(ReportsRows):
    """The start every pipeline shares (`_load`): its checked options; the tokenizer; the model in its dtype on
    its device, fitted to the CPU (load_model), with a vocabulary that covers the tokenizer's; empty stats.
    `_limit` fixes the tokens a row may have: the window less what the task reserves (ModelOptions)."""

    def _load(self, model_dir, options, model_class, device, text_column: str | None) -> None:
        self.options, self.text_column = options, text_column
        self.device = torch.device(device)
        self.tokenizer = PersimmonTokenizer.from_pretrained(model_dir)
        self.model = load_model(model_class, model_dir, options.dtype, self.device)
        self.config = self.model.config
        check_vocabulary(self.tokenizer, self.config)
        self.stats = PipelineStats()

    def _limit(self, reserved: int | None = None) -> int:
        """`reserved`: what the task keeps beyond its options' reserved_tokens() (a zero-shot label's tokens)."""
        self.max_length = self.options.prompt_limit(self.config.max_position_embeddings, reserved=reserved)
        return self.max_length
