"""Output files: what a shard's output is called, the files one committed output is made of, and how the
pipelines' tables are written (Parquet; openai-batch's responses and errors as JSON Lines)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ..inputs.formats import ERRORS_SUFFIX, REQUESTS, SUFFIXES, Format, plain_name, suffix_of


def output_name(shard: str, fmt: Format = Format.PARQUET) -> str:
    """The output file of a shard, relative to the output folder."""
    if fmt != Format.PARQUET:
        shard = plain_name(shard)
    if fmt == REQUESTS:
        return shard if shard.endswith(".jsonl") else shard + ".jsonl"
    if fmt != Format.PARQUET and SUFFIXES.get(suffix_of(shard)) == fmt:
        shard = shard[: -len(suffix_of(shard))]
    return shard if shard.endswith(".parquet") else shard + ".parquet"


def companions(name: str, fmt: Format) -> list[str]:
    """Every file one committed output is made of: the output itself first, then (openai-batch) its errors."""
    if fmt == REQUESTS:
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        return [name, stem + ERRORS_SUFFIX]
    return [name]


class ParquetSink:
    """Output tables into one Parquet file."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path, self.writer = fs, path, None

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, filesystem=self.fs)
        self.writer.write_table(table)

    @property
    def empty(self) -> bool:
        return self.writer is None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RequestSink:
    """openai-batch's output tables (columns ok, record) into the responses file and the errors file: one
    JSON line each, in input order."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.files = [fs.open_output_stream(p) for p in companions(path, REQUESTS)]
        self.empty = True

    def write(self, table: pa.Table) -> None:
        self.empty = False
        ok, records = table.column("ok").to_pylist(), table.column("record").to_pylist()
        chunks: list[list[bytes]] = [[], []]
        for good, record in zip(ok, records):
            chunks[0 if good else 1].append(record.encode() + b"\n")
        for f, chunk in zip(self.files, chunks):
            if chunk:
                f.write(b"".join(chunk))
                f.flush()  # what is done is on disk as it goes (a reader of the temporary sees whole lines)

    def close(self) -> None:
        for f in self.files:
            f.close()


def sink_for(fmt: str, fs: pafs.FileSystem, path: str):
    return RequestSink(fs, path) if fmt == REQUESTS else ParquetSink(fs, path)


def temporary_suffix(fmt: Format) -> str:
    return ".jsonl" if fmt == REQUESTS else ".parquet"


def request_counts(entry_or_summary: dict[str, Any]) -> dict[str, int]:
    """OpenAI's request_counts (total, completed, failed) from rows and errors."""
    total, failed = entry_or_summary.get("rows", 0), entry_or_summary.get("errors", 0)
    return {"total": total, "completed": total - failed, "failed": failed}
