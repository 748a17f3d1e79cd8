"""ShardWorker: what one Ray actor does. It loads the pipeline once, then streams each work unit's record
batches from Parquet through it into an attempt-unique temporary output file. It holds one record batch
window at a time, and reports the outcome of a unit as a UnitResult (the runner decides about retries)."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .shards import META_FINGERPRINT, META_IDENTITY, META_INPUT, WorkUnit, join, temporary_name
from .spec import JobSpec

# the counters a work unit's result carries (summed over slices and over the job by the runner)
UNIT_COUNTS = ("rows", "errors", "truncated", "real_tokens", "padded_tokens", "generated_tokens", "nonfinite")
PROGRESS_SECONDS = 0.5
PIPELINES = {"classify": "ClassificationPipeline", "generate": "GenerationPipeline", "embed": "EmbeddingPipeline"}


class InputProblem(ValueError):
    """The input itself is wrong for this job (not Parquet, a missing or clashing column, changed while the
    job ran): another attempt would fail the same way."""


@dataclass
class UnitResult:
    ok: bool
    temp: str | None = None  # the finished temporary file, relative to the output
    stats: dict[str, Any] = field(default_factory=dict)  # UNIT_COUNTS, seconds, node, host, pid, peak memory
    error: str | None = None
    permanent: bool = False  # retrying cannot help

    @classmethod
    def failed(cls, exc: BaseException, context: str = "") -> "UnitResult":
        # pyarrow's ArrowInvalid (not Parquet, corrupt pages) is a ValueError, like the pipelines' column errors
        permanent = isinstance(exc, ValueError)
        return cls(False, error=f"{context}{type(exc).__name__}: {exc}", permanent=permanent)


def build_pipeline(spec: JobSpec, device: str):
    """The pipeline a job spec describes."""
    import pipelines  # torch comes with it: only the workers need it

    pipeline = getattr(pipelines, PIPELINES[spec.task])
    return pipeline(spec.model, spec.options, device=device, text_column=spec.text_column)


def current_node() -> str:
    """The Ray node this process runs on (its host name outside Ray), for the manifest's audit trail."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


class ShardWorker:
    def __init__(self, spec: JobSpec, fingerprint: str, run_id: str, in_fs: pafs.FileSystem, in_base: str,
                 out_fs: pafs.FileSystem, out_base: str, device: str, threads: int | None,
                 report: Callable[[str, int], None] | None = None) -> None:
        """report(unit key, rows): called as model batches finish (at most every PROGRESS_SECONDS), for
        live progress."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.spec, self.fingerprint, self.run_id = spec, fingerprint, run_id
        self.in_fs, self.in_base, self.out_fs, self.out_base = in_fs, in_base, out_fs, out_base
        self.node = current_node()
        self.report = report
        self.pipeline = build_pipeline(spec, device)

    def pid(self) -> int:
        return os.getpid()

    def process(self, unit: WorkUnit) -> UnitResult:
        """Run one unit into a temporary file."""
        start = time.perf_counter()
        before = self.pipeline.stats.as_dict()
        temp = temporary_name(unit, self.run_id)
        try:
            rows = self._run(unit, temp)
        except Exception as exc:  # a bad shard is a result to report, not a crash of the actor
            self._discard(temp)
            return UnitResult.failed(exc)
        after = self.pipeline.stats.as_dict()
        delta = {k: after[k] - before[k] for k in UNIT_COUNTS if k != "rows"}  # rows: counted by _run
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return UnitResult(True, temp, {"rows": rows, "seconds": time.perf_counter() - start, "node": self.node,
                                       "host": socket.gethostname(), "pid": os.getpid(),
                                       "peak_rss_mb": round(peak_mb, 1), **delta})

    def _open(self, unit: WorkUnit):
        """The shard as it was planned: a file that changed since is not read (its identity would lie)."""
        path = join(self.in_base, unit.shard)
        info = self.in_fs.get_file_info(path)
        if unit.identity and (info.size, info.mtime_ns) != (unit.identity.get("size"), unit.identity.get("mtime_ns")):
            raise InputProblem(f"{unit.shard} changed while the job ran; rerun to process its new content")
        return self.in_fs.open_input_file(path)

    def _run(self, unit: WorkUnit, temp: str) -> int:
        with self._open(unit) as source:
            try:
                parquet = pq.ParquetFile(source)
            except pa.ArrowInvalid as exc:
                raise InputProblem(f"not a Parquet file ({exc})") from None
            columns = parquet.schema_arrow.names
            if self.spec.text_column not in columns:
                raise InputProblem(f"shard {unit.shard} has no column {self.spec.text_column!r}; its columns are {columns}")
            metadata = {**(parquet.schema_arrow.metadata or {}), META_FINGERPRINT: self.fingerprint.encode(),
                        META_INPUT: unit.shard.encode(), META_IDENTITY: json.dumps(unit.identity).encode()}
            metadata.pop(b"pandas", None)  # describes the input's columns, not ours
            writer = None
            rows = 0
            progress = _Progress(unit.key, self.report)
            self.pipeline.on_rows = progress
            try:
                batches = parquet.iter_batches(batch_size=self.spec.runner.batch_rows, row_groups=unit.row_groups)
                for out in self.pipeline.stream(batches):  # generation overlaps one batch's tail with the next
                    out = out.replace_schema_metadata(metadata)
                    if writer is None:
                        writer = self._writer(temp, out.schema)
                    writer.write_table(out)
                    rows += out.num_rows
                if writer is None:  # an empty shard still gets its (empty) output file
                    out = self.pipeline(parquet.schema_arrow.empty_table()).replace_schema_metadata(metadata)
                    writer = self._writer(temp, out.schema)
                    writer.write_table(out)
            finally:
                self.pipeline.on_rows = None
                progress.flush()
                if writer is not None:
                    writer.close()
        return rows

    def merge(self, shard: str, temps: list[str]) -> UnitResult:
        """Concatenate a sliced shard's part files, in order, into one temporary file (streamed by row group)."""
        temp = temporary_name(WorkUnit(shard), self.run_id)
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
            if writer is not None:
                writer.close()
            for part in temps:
                self._discard(part)
        except Exception as exc:
            self._discard(temp)
            result = UnitResult.failed(exc, f"merging parts of {shard}: ")
            result.permanent = False  # the parts are ours: a storage hiccup, worth another try
            return result
        return UnitResult(True, temp, {"rows": rows})

    def _writer(self, temp: str, schema: pa.Schema) -> pq.ParquetWriter:
        self.out_fs.create_dir(join(self.out_base, temp).rsplit("/", 1)[0], recursive=True)
        return pq.ParquetWriter(join(self.out_base, temp), schema, filesystem=self.out_fs)

    def _discard(self, temp: str) -> None:
        try:
            self.out_fs.delete_file(join(self.out_base, temp))
        except (FileNotFoundError, OSError):
            pass


class _Progress:
    """Rows a unit has processed, passed on to the runner's counter as model batches finish, at most every
    PROGRESS_SECONDS (a report is a Ray call)."""

    def __init__(self, key: str, report: Callable[[str, int], None] | None) -> None:
        self.key, self.report = key, report
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, rows: int) -> None:
        self.pending += rows
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.report is not None and self.pending:
            self.report(self.key, self.pending)
        self.pending, self.last = 0, time.monotonic()

