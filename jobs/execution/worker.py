"""UnitWorker: what one Ray actor does. Created cheaply (the pool sees it placed), it loads the pipeline once
(after checking the model is the one the job pinned), then streams each work unit's record batches from
Parquet through it into an attempt-unique temporary output file, one record batch window at a time. It
reports each unit's outcome as a UnitResult (the dispatcher decides about retries).

Its methods run in two concurrency groups: "work" (load, process, merge: one at a time, on one thread) and
"control" (ready, ping): a ping is answered while a long model batch runs, with the rows done so far and how
long the current batch has been running, which is how the driver tells a slow actor from a stalled one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import socket
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from pipelines.errors import one_line
from pipelines.schema import INPUT_ERROR, missing_text_column

from ..errors import ModelChanged
from ..inputs.checksum import check_pin
from ..inputs import formats
from ..output import sinks
from ..output.commit import META_FINGERPRINT, META_IDENTITY, META_INPUT, temporary_name
from ..output.paths import join
from ..output.lease import this_machine
from ..planning.units import WorkUnit
from ..spec import JobSpec
from .layout import Device
from .dispatcher import UNIT_COUNTS, Fatal, UnitResult
from .metrics import ActorMetrics, job_label

CONCURRENCY_GROUPS = {"work": 1, "control": 1}
# what a write to a full, read-only or over-quota output says (pyarrow's errors carry the text, not errno)
FULL_OR_READ_ONLY = ("No space left on device", "Read-only file system", "Disk quota exceeded")


class Cancelled(Exception):
    """The driver stopped this attempt: another attempt of the same unit finished first."""


class InputProblem(ValueError):
    """The input itself is wrong for this job (not Parquet, a missing or clashing column, changed while the
    job ran): another attempt would fail the same way."""


def failed(exc: BaseException, context: str = "") -> UnitResult:
    # pyarrow's ArrowInvalid (not Parquet, corrupt pages) is a ValueError, like the pipelines' column errors
    # the reason is recorded in the manifest and printed: one line, however the exception was worded
    if isinstance(exc, ModelChanged):
        return UnitResult(False, error=one_line(exc), fatal=Fatal.MODEL_CHANGED)
    if isinstance(exc, OSError) and any(m in str(exc) for m in FULL_OR_READ_ONLY):
        return UnitResult(False, error=context + one_line(exc), fatal=Fatal.OUTPUT_UNWRITABLE)
    return UnitResult(False, error=context + one_line(exc, with_type=True), permanent=isinstance(exc, ValueError))


def broken_compression(exc: OSError, shard: str) -> OSError | InputProblem:
    """A codec's error on a compressed shard (cut short, corrupt) is the input's problem, which another attempt
    would meet again; any other OSError (a network read) stays one that another attempt may not."""
    problem = formats.compression_problem(exc, shard)
    return exc if problem is None else InputProblem(f"{problem}; nothing of it was written")


def compressed_data(batches, shard: str):
    """The batches, with a codec's error met part way through as the shard's InputProblem."""
    try:
        yield from batches
    except OSError as exc:
        raise broken_compression(exc, shard) from None


def build_pipeline(spec: JobSpec, device: Device):
    """The pipeline a job spec describes."""
    from pipelines.tasks import TASKS

    pipeline = TASKS[spec.task].pipeline_class()  # torch comes with it: only the workers need it
    return pipeline(spec.model, spec.options, device=device, text_column=spec.text_column)


def current_node() -> str:
    """The Ray node this process runs on (its host name outside Ray), for the manifest's audit trail."""
    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def rows_of(batches, skip: int, take: int):
    """Rows skip .. skip + take of a stream of record batches, as record batches."""
    for batch in batches:
        if take <= 0:
            return
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        part = batch.slice(skip, take)
        skip, take = 0, take - part.num_rows
        yield part


def skip_where_null(batch, text_column: str, column: str):
    """The batch with the text of rows whose `column` is null (or an empty string) set to null: they keep their
    place (an error row) but cost no model work."""
    import pyarrow.compute as pc

    if column not in batch.schema.names:
        raise InputProblem(f"no column {column!r}; its columns are {batch.schema.names}")
    index = batch.schema.get_field_index(text_column)
    text, values = batch.column(index), batch.column(column)
    missing = pc.is_null(values)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):  # "" and " " are no label either
        missing = pc.or_(missing, pc.equal(pc.utf8_trim_whitespace(values), ""))
    masked = pc.if_else(missing, pa.scalar(None, text.type), text)
    return batch.set_column(index, batch.schema.field(index), masked) if isinstance(batch, pa.Table) else \
        pa.RecordBatch.from_arrays([masked if i == index else c for i, c in enumerate(batch.columns)],
                                   schema=batch.schema)


class UnitWorker:
    def __init__(self, spec: JobSpec, fingerprint: str, run_id: str, pin: dict[str, Any], in_fs: pafs.FileSystem,
                 in_base: str, out_fs: pafs.FileSystem, out_base: str, device: Device, threads: int | None) -> None:
        self.spec, self.fingerprint, self.run_id, self.pin = spec, fingerprint, run_id, pin
        self.in_fs, self.in_base, self.out_fs, self.out_base = in_fs, in_base, out_fs, out_base
        self.device, self.threads = device, threads
        self.pipeline = None
        self.node = current_node()
        self.metrics = ActorMetrics(job_label(spec.name, spec.output))  # live counters, through Ray's metrics
        # what a ping reports (written by the work thread, read by the control thread)
        self._rows = 0
        self._progress_at = time.monotonic()
        self._slowest = 0.0
        self._token, self._cancel = 0, None  # the current attempt's number, and the one the driver cancelled

    @ray.method(concurrency_group="control")
    def ready(self) -> dict[str, Any]:
        """Placed: where this actor runs (the pool kills a stalled one by pid when it is on the driver's machine)."""
        return {"pid": os.getpid(), "machine": this_machine(), "node": self.node, "niceness": os.nice(0)}

    @ray.method(concurrency_group="control")
    def ping(self) -> dict[str, float]:
        return {"rows": self._rows, "busy_for": time.monotonic() - self._progress_at, "slowest": self._slowest}

    @ray.method(concurrency_group="control")
    def cancel(self, token: int) -> None:
        """Stop attempt `token` at its next record batch (a later attempt is never stopped by it)."""
        self._cancel = token

    @ray.method(concurrency_group="work")
    def load(self) -> UnitResult:
        """Load the pipeline, refusing a model that is not the job's (checked before and after loading)."""
        self._progress_at = time.monotonic()
        try:
            check_pin(self.spec.model, self.pin)
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            self.pipeline = build_pipeline(self.spec, self.device)
            check_pin(self.spec.model, self.pin)
            if self.device == Device.CPU:
                import torch

                self.threads = torch.get_num_threads()  # what the units really ran with: in their stats
        except ModelChanged as exc:
            return UnitResult(False, error=str(exc), fatal=Fatal.MODEL_CHANGED)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            return UnitResult(False, error=f"{type(exc).__name__}: {text[-1] if text else exc}")
        self._progress_at = time.monotonic()
        return UnitResult(True)

    def _on_rows(self, rows: int) -> None:
        self._on_progress()
        self._rows += rows
        self.metrics.rows(rows)

    def _on_progress(self) -> None:
        """The pipeline moved (a model batch, an engine step): the time since the last move is what the driver
        judges a stall by."""
        now = time.monotonic()
        self._slowest = max(self._slowest, now - self._progress_at)
        self._progress_at = now

    @ray.method(concurrency_group="work")
    def process(self, unit: WorkUnit, token: int = 0) -> UnitResult:
        """Run one unit into a temporary file (attempt `token` of the dispatcher)."""
        start = time.perf_counter()
        self._rows, self._progress_at, self._token = 0, time.monotonic(), token
        before = self.pipeline.stats.as_dict()
        fmt = formats.shard_format(unit.shard, self.spec.input_format)
        temp = temporary_name(unit.key, self.run_id, sinks.temporary_suffix(fmt))
        try:
            rows = self._run(unit, temp, fmt)
            check_pin(self.spec.model, self.pin)  # weights read through a memory map change with the file
        except Exception as exc:  # a bad shard is a result to report, not a crash of the actor
            for name in sinks.companions(temp, fmt):
                self._discard(name)
            self.metrics.unit(False, time.perf_counter() - start)
            return failed(exc)
        after = self.pipeline.stats.as_dict()
        delta = {k: after[k] - before[k] for k in UNIT_COUNTS if k != "rows"}  # rows: counted by _run
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        seconds = time.perf_counter() - start
        self.metrics.unit(True, seconds, delta)
        return UnitResult(True, temp, {"rows": rows, "seconds": seconds, "node": self.node,
                                       "host": socket.gethostname(), "pid": os.getpid(), "threads": self.threads,
                                       "peak_rss_mb": round(peak_mb, 1), **delta})

    def _written(self, out: pa.Table, fmt: str) -> pa.Table:
        """A pipeline's output as the job writes it: without the reader's per-row problems (they are in the
        error column now), a CSV's text column (read as bytes) as strings."""
        if INPUT_ERROR in out.column_names:
            out = out.drop_columns([INPUT_ERROR])
        return formats.text_as_string(out, self.spec.text_column) if fmt == formats.Format.CSV else out

    def _open(self, unit: WorkUnit):
        """The shard as it was planned: a file that changed since is not read (its identity would lie)."""
        path = join(self.in_base, unit.shard)
        info = self.in_fs.get_file_info(path)
        if unit.identity and (info.size, info.mtime_ns) != (unit.identity.get("size"), unit.identity.get("mtime_ns")):
            raise InputProblem(f"{unit.shard} changed while the job ran; rerun to process its new content")
        if formats.shard_format(unit.shard, self.spec.input_format) == formats.Format.PARQUET:
            return self.in_fs.open_input_file(path)
        return formats.open_source(self.in_fs, path, limit=unit.identity.get("size"))  # not past its planned size

    def _read(self, source, unit: WorkUnit, fmt: str) -> formats.Opened:
        """The unit's rows as record batches, with the input's schema metadata."""
        batch_rows = self.spec.runner.batch_rows
        if fmt == formats.REQUESTS:
            opened = formats.read_requests(source, batch_rows)
            return dataclasses.replace(opened, batches=compressed_data(opened.batches, unit.shard))
        if fmt != formats.Format.PARQUET:
            try:
                opened = formats.read_tabular(source, fmt, self.spec.text_column, batch_rows,
                                              self.spec.csv_delimiter or ",")
            except (pa.ArrowInvalid, ValueError) as exc:
                raise InputProblem(f"not a {formats.NAMES[fmt]} file ({exc})") from None
            except OSError as exc:
                raise broken_compression(exc, unit.shard) from None
            opened = dataclasses.replace(opened, batches=compressed_data(opened.batches, unit.shard))
        else:
            try:
                parquet = pq.ParquetFile(source)
            except pa.ArrowInvalid as exc:
                raise InputProblem(f"not a Parquet file ({exc})") from None
            batches = parquet.iter_batches(batch_size=batch_rows, row_groups=unit.row_groups)
            if unit.row_groups is not None:
                batches = rows_of(batches, unit.skip, unit.rows)
            opened = formats.Opened(parquet.schema_arrow, batches, dict(parquet.schema_arrow.metadata or {}))
        problem = missing_text_column(self.spec.text_column, opened.schema.names, unit.shard)
        if problem:  # the plan saw the column; the file was replaced since
            raise InputProblem(problem)
        return opened

    def _run(self, unit: WorkUnit, temp: str, fmt: str) -> int:
        with self._open(unit) as source:
            opened = self._read(source, unit, fmt)
            metadata = {**opened.metadata, META_FINGERPRINT: self.fingerprint.encode(),
                        META_INPUT: unit.shard.encode(), META_IDENTITY: json.dumps(unit.identity).encode()}
            metadata.pop(b"pandas", None)  # describes the input's columns, not ours
            self.out_fs.create_dir(join(self.out_base, temp).rsplit("/", 1)[0], recursive=True)
            sink = sinks.sink_for(fmt, self.out_fs, join(self.out_base, temp))
            rows = 0
            self.pipeline.on_rows, self.pipeline.on_progress = self._on_rows, self._on_progress
            try:
                batches = opened.batches
                if self.spec.only_where is not None:
                    batches = (skip_where_null(b, self.spec.text_column, self.spec.only_where) for b in batches)
                for out in self.pipeline.stream(batches):  # generation overlaps one batch's tail with the next
                    if self._cancel == self._token:
                        raise Cancelled("cancelled: another attempt of this unit finished first")
                    sink.write(self._written(out, fmt).replace_schema_metadata(metadata))
                    rows += out.num_rows
                if sink.empty:  # an empty shard still gets its (empty) output file
                    empty = self.pipeline(opened.schema.empty_table())
                    sink.write(self._written(empty, fmt).replace_schema_metadata(metadata))
            finally:
                self.pipeline.on_rows = self.pipeline.on_progress = None
                sink.close()
        return rows

    @ray.method(concurrency_group="work")
    def merge(self, shard: str, temps: list[str]) -> UnitResult:
        """Concatenate a sliced shard's part files, in order, into one temporary file (streamed by row group)."""
        temp = temporary_name(shard, self.run_id)
        self._rows, self._progress_at = 0, time.monotonic()
        try:
            writer, rows = None, 0
            for part in temps:
                with self.out_fs.open_input_file(join(self.out_base, part)) as f:
                    parquet = pq.ParquetFile(f)
                    for g in range(parquet.num_row_groups):
                        table = parquet.read_row_group(g)
                        if writer is None:
                            writer = self._writer(temp, table.schema)
                        writer.write_table(table)
                        rows += table.num_rows
                        self._progress_at = time.monotonic()
            if writer is not None:
                writer.close()
            for part in temps:
                self._discard(part)
        except Exception as exc:
            self._discard(temp)
            result = failed(exc, f"merging parts of {shard}: ")
            result.permanent = False  # the parts are ours: a storage hiccup, worth another try
            return result
        return UnitResult(True, temp, {"rows": rows})

    def _writer(self, temp: str, schema: pa.Schema) -> pq.ParquetWriter:
        self.out_fs.create_dir(join(self.out_base, temp).rsplit("/", 1)[0], recursive=True)
        return pq.ParquetWriter(join(self.out_base, temp), schema, filesystem=self.out_fs)

    def _discard(self, temp: str) -> None:
        try:
            self.out_fs.delete_file(join(self.out_base, temp))
        except OSError:
            pass
