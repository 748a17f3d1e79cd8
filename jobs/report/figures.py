"""What a job's output says about its run, as plain numbers: read from `_manifest.json` (what ran, per-shard
rows, errors, tokens and timings, which actor did each) and from the committed files' result columns (labels,
scores, completion lengths, errors). Needs neither Ray nor torch; the report page (page.py) and the drift
table (drift.py) are drawn from a RunFigures.

Distributions are kept as their values (numpy arrays): a run of millions of rows reads a few columns, and the
page bins them; nothing per row goes into the page but the error examples.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from persimmon.files import VOCAB_FILES

from ..errors import ShardState, UsageError
from ..output.manifest import Manifest
from ..output.paths import join, resolve

TOKEN_SAMPLE = 5000  # rows whose text is tokenized for the length histogram, where the output has no counts
EXAMPLES = 3  # example rows shown per error kind


@dataclasses.dataclass
class ShardFigures:
    name: str
    state: str
    rows: int = 0
    errors: int = 0
    truncated: int = 0
    seconds: float = 0.0
    actor: str = ""  # host:pid of the actor process that committed it
    committed_at: float | None = None  # the driver's clock (epoch seconds)
    real_tokens: int = 0
    padded_tokens: int = 0
    error: str = ""  # why a failed shard failed


@dataclasses.dataclass
class RunFigures:
    output: str
    task: str
    meta: dict[str, Any]  # what ran: model, checksum, options, layout, version, start and end
    shards: list[ShardFigures]
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # label -> rows
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # "score", "perplexity", ... -> values
    finish_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    token_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    token_lengths_note: str = ""
    rows: int = 0  # rows in the committed files read

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    @property
    def padding_waste(self) -> float | None:
        real = sum(s.real_tokens for s in self.shards)
        padded = sum(s.padded_tokens for s in self.shards)
        return padded / real if real else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.rows if self.rows else 0.0


def error_kind(message: str) -> str:
    """An error's kind: its text up to the first colon or parenthesis (the rest names the row's specifics)."""
    cut = len(message)
    for mark in (":", " ("):
        at = message.find(mark)
        if 0 < at < cut:
            cut = at
    return message[:cut].strip() or message


def collect(output: str, manifest: Manifest | None = None) -> RunFigures:
    """The figures of the job whose output folder (local or s3://) is `output` (with `manifest`: that record
    of it, as a run holds it before writing it)."""
    fs, base = resolve(output)
    manifest = manifest or Manifest.load(fs, base)
    if manifest is None:
        raise UsageError(f"no manifest in {output}: no job has written there")
    data = manifest.data
    spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    meta = {"task": spec.get("task"), "name": spec.get("name"), "date": spec.get("date"),
            "model": model.get("path"), "checksum": model.get("checksum"), "fingerprint": data.get("fingerprint"),
            "options": spec.get("options") or {}, "runner": spec.get("runner") or {}, "layout": data.get("layout"),
            "version": data.get("package_version"), "started_at": data.get("started_at"),
            "finished_at": data.get("finished_at"), "input": data.get("input"), "output": data.get("output"),
            "runs": len(data.get("runs") or []), "summary": data.get("summary") or {}}
    figures = RunFigures(output, str(spec.get("task") or ""), meta, [])
    for name, entry in sorted(manifest.shards.items()):
        actor = f"{entry.get('host')}:{entry.get('pid')}" if entry.get("pid") else ""
        figures.shards.append(ShardFigures(
            name, str(entry.get("state")), int(entry.get("rows") or 0), int(entry.get("errors") or 0),
            int(entry.get("truncated") or 0), float(entry.get("seconds") or 0.0), actor, entry.get("committed_at"),
            int(entry.get("real_tokens") or 0), int(entry.get("padded_tokens") or 0), str(entry.get("error") or "")))
    files = [join(base, e["output"]) for e in manifest.shards.values()
             if e.get("state") == ShardState.DONE.value and str(e.get("output", "")).endswith(".parquet")]
    _read_results(figures, fs, files, str(spec.get("text_column") or "text"), model.get("path"))
    return figures


RESULT_COLUMNS = ("label", "labels", "score", "perplexity", "logprob", "completion_tokens", "prompt_tokens",
                  "tokens", "finish_reason", "error", "embedding")


def _read_results(figures: RunFigures, fs, files: list[str], text_column: str, model: str | None) -> None:
    """One pass over the committed files: the result columns of each, and its text only where it is needed
    (error examples, or the token-length sample of an output without token counts)."""
    values: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    lengths: dict[str, list[np.ndarray]] = collections.defaultdict(list)  # prompt_tokens / tokens, as written
    sample: list[str] = []  # texts to tokenize when the output has no token counts
    for path in files:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            table = parquet.read(columns=[c for c in RESULT_COLUMNS if c in names])
            errors = table.column("error").to_pylist() if "error" in table.column_names else []
            counted = any(c in names for c in LENGTH_COLUMNS)
            wanted = any(e is not None for e in errors) or (not counted and len(sample) < TOKEN_SAMPLE)
            texts = parquet.read(columns=[text_column]).column(0).to_pylist() \
                if wanted and text_column in names else None
        figures.rows += table.num_rows
        for name in ("score", "perplexity", "logprob", "completion_tokens"):
            if name in table.column_names:
                column = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                values[name].append(column[np.isfinite(column)])
        for name in LENGTH_COLUMNS:
            if name in table.column_names:
                lengths[name].append(table.column(name).to_numpy(zero_copy_only=False).astype(np.float64))
        if "label" in table.column_names:
            figures.labels.update(x for x in table.column("label").to_pylist() if x is not None)
        if "labels" in table.column_names:
            figures.labels.update(x for row in table.column("labels").to_pylist() if row for x in row)
        if "finish_reason" in table.column_names:
            figures.finish_reasons.update(x for x in table.column("finish_reason").to_pylist() if x is not None)
        if "embedding" in table.column_names:
            norms = [float(np.linalg.norm(v)) for v in table.column("embedding").to_pylist() if v is not None]
            values["embedding norm"].append(np.asarray(norms, dtype=np.float64))
        if texts is not None and not counted and len(sample) < TOKEN_SAMPLE:
            sample += [t for t in texts if t][:TOKEN_SAMPLE - len(sample)]
        for i, message in enumerate(errors):
            if message is None:
                continue
            kind = error_kind(message)
            figures.error_kinds[kind] += 1
            shown = figures.error_examples.setdefault(kind, [])
            if len(shown) < EXAMPLES:
                snippet = "" if texts is None or texts[i] is None else repr(str(texts[i])[:80])
                shown.append(f"{Path(path).name} row {i}: {message}" + (f" (text {snippet})" if snippet else ""))
    figures.values = {k: np.concatenate(v) for k, v in values.items() if v}
    _token_lengths(figures, lengths, sample, model)


LENGTH_COLUMNS = ("prompt_tokens", "tokens")  # an output's own token counts per row, in order of preference


def _token_lengths(figures: RunFigures, lengths: dict[str, list[np.ndarray]], sample: list[str],
                   model: str | None) -> None:
    """Tokens per row: the output's own counts where it has them (prompt_tokens, tokens), else the text of a
    sample of rows tokenized with the model's tokenizer (when it is still where the job read it)."""
    for column in LENGTH_COLUMNS:
        if lengths.get(column):
            found = np.concatenate(lengths[column])
            figures.token_lengths = found[np.isfinite(found)].astype(np.int64)
            figures.token_lengths_note = f"from the output's {column} column"
            return
    vocab = next((Path(model) / n for n in VOCAB_FILES if model and (Path(model) / n).is_file()), None)
    if vocab is None:
        figures.token_lengths_note = "not shown: the model's tokenizer is not where the job read it"
        return
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(vocab))
    figures.token_lengths = np.asarray([len(ids) for ids in pieces.encode(sample)], dtype=np.int64)
    figures.token_lengths_note = f"the text of {len(sample):,} rows tokenized with the model's tokenizer"
