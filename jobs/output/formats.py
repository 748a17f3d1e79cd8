"""Input and output file formats: which format a shard is, how it is read as record batches, what its output
is called and how the output is written.

Tabular inputs are Parquet, CSV or JSON Lines, by suffix (`.parquet`; `.csv`; `.jsonl`, `.ndjson`) or as the job
says (`--input-format`); a file of another suffix given by name is Parquet, as before. Their output is
Parquet, named after the input with its suffix replaced (`tickets.csv` -> `tickets.parquet`). CSV and JSON Lines
are read with pyarrow's streaming readers, one block at a time, so a big file never sits in memory whole; they
carry no row count or row groups, so such a shard is one work unit and its row count is an estimate (from the
first block) until it is done.

`openai-batch` reads OpenAI batch request files (`.jsonl`, one request per line) and writes two JSON Lines
files per input: the responses under the input's name and the failed lines beside it (`x.errors.jsonl`).
JSON Lines carry no metadata, so a run recognises its own committed pair by the journal record written
before the files are moved into place (manifest.py), not by the files' contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import UsageError

TABULAR = ("parquet", "csv", "jsonl")
REQUESTS = "openai"  # OpenAI batch request lines (openai-batch)
SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
ERRORS_SUFFIX = ".errors.jsonl"
NAMES = {"parquet": "Parquet", "csv": "CSV", "jsonl": "JSON Lines", REQUESTS: "OpenAI batch request"}
READ_BLOCK = 1 << 20  # bytes per block of the CSV / JSON readers (a record batch each)
REQUEST_COLUMNS = pa.schema([("line", pa.int64()), ("request", pa.binary())])


def suffix_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[1].lower() if "." in base else ""


def shard_format(shard: str, forced: str | None = None) -> str:
    """The format of a shard: the job's (--input-format, or openai-batch's request files), else by suffix."""
    if forced:
        return forced
    return SUFFIXES.get(suffix_of(shard), "parquet")


def takes(name: str, forced: str | None) -> bool:
    """Whether a file found in an input folder is input: of a known tabular suffix, or (with a format given)
    any file, or for openai-batch a `.jsonl` that is not one of our own error files."""
    if forced == REQUESTS:
        return suffix_of(name) == ".jsonl" and not name.endswith(ERRORS_SUFFIX)
    return forced is not None or suffix_of(name) in SUFFIXES


def output_name(shard: str, fmt: str = "parquet") -> str:
    """The output file of a shard, relative to the output folder."""
    if fmt == REQUESTS:
        return shard if shard.endswith(".jsonl") else shard + ".jsonl"
    if fmt != "parquet" and SUFFIXES.get(suffix_of(shard)) == fmt:
        shard = shard[: -len(suffix_of(shard))]
    return shard if shard.endswith(".parquet") else shard + ".parquet"


def companions(name: str, fmt: str) -> list[str]:
    """Every file one committed output is made of: the output itself first, then (openai-batch) its errors."""
    if fmt == REQUESTS:
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        return [name, stem + ERRORS_SUFFIX]
    return [name]


def check_format(name: str | None) -> str | None:
    if name is not None and name not in TABULAR:
        raise UsageError(f"--input-format must be one of {list(TABULAR)}, got {name!r}")
    return name


@dataclass
class Opened:
    """A shard open for reading: its columns and its record batches (read lazily, once)."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    metadata: dict[bytes, bytes]


def _rebatch(batches, rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of at most `rows` rows (a CSV block may hold many more)."""
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def open_csv(source, text_column: str | None):
    import pyarrow.csv as pacsv

    types = {text_column: pa.string()} if text_column else {}
    # newlines_in_values: a quoted text may span lines (tickets, documents), at some cost in parsing speed
    return pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=READ_BLOCK),
                          parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))


def open_json(source, text_column: str | None):
    import pyarrow.json as pajson

    parse = pajson.ParseOptions(explicit_schema=pa.schema([(text_column, pa.string())]),
                                unexpected_field_behavior="infer") if text_column else None
    return pajson.open_json(source, read_options=pajson.ReadOptions(block_size=READ_BLOCK), parse_options=parse)


def read_tabular(source, fmt: str, text_column: str | None, batch_rows: int) -> Opened:
    """A CSV or JSON Lines shard as record batches; ValueError (pyarrow's ArrowInvalid) when it is not one."""
    if fmt == "csv":
        reader = open_csv(source, text_column)
        return Opened(reader.schema, _rebatch(_blocks(reader, fmt), batch_rows), {})
    order = open_json(source, None).schema.names  # the file's own column order (the text column's type is
    source.seek(0)  # fixed by an explicit schema, which would put it first)
    reader = open_json(source, text_column)
    names = [n for n in order if n in reader.schema.names] + [n for n in reader.schema.names if n not in order]
    schema = pa.schema([reader.schema.field(n) for n in names])
    return Opened(schema, (b.select(names) for b in _rebatch(_blocks(reader, fmt), batch_rows)), {})


def _blocks(reader, fmt: str) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:  # a later block that does not parse, or does not fit the first's types
            raise ValueError(f"not a valid {NAMES[fmt]} file past its start ({exc}); a column whose values "
                             "change type inside the file can be read after converting the file to Parquet") from None
        yield batch


def _lines(source) -> Iterator[bytes]:
    """The lines of a binary stream (without their line ends), read one block at a time."""
    rest = b""
    while True:
        block = source.read(READ_BLOCK)
        if not block:
            break
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def read_requests(source, batch_rows: int) -> Opened:
    """An OpenAI batch file as record batches of (line number, the line's bytes); blank lines are skipped."""
    def batches() -> Iterator[pa.RecordBatch]:
        numbers: list[int] = []
        lines: list[bytes] = []
        for number, line in enumerate(_lines(source), start=1):
            if not line.strip():
                continue
            numbers.append(number)
            lines.append(line.rstrip(b"\r"))
            if len(lines) == batch_rows:
                yield pa.record_batch([pa.array(numbers, pa.int64()), pa.array(lines, pa.binary())],
                                      schema=REQUEST_COLUMNS)
                numbers, lines = [], []
        if lines:
            yield pa.record_batch([pa.array(numbers, pa.int64()), pa.array(lines, pa.binary())], schema=REQUEST_COLUMNS)

    return Opened(REQUEST_COLUMNS, batches(), {})


def inspect_text_file(fs: pafs.FileSystem, path: str, fmt: str, text_column: str | None) -> tuple[list[str], int]:
    """(columns, estimated rows) of a CSV, JSON Lines or request file from its first block; ValueError when it
    is not of its format."""
    size = fs.get_file_info(path).size or 0
    with fs.open_input_file(path) as f:
        if fmt == REQUESTS:
            head = f.read(min(size, READ_BLOCK))
            lines = head.count(b"\n") + (0 if head.endswith(b"\n") or not head else 1)
            return [], round(lines * size / len(head)) if head else 0
        # JSON: the columns as the file has them (an explicit schema would add the text column to any file)
        reader = open_csv(f, text_column) if fmt == "csv" else open_json(f, None)
        columns = reader.schema.names
        try:
            first = reader.read_next_batch()
        except StopIteration:
            return columns, 0
        read = max(1, min(size, READ_BLOCK))
        return columns, max(first.num_rows, round(first.num_rows * size / read))


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


def temporary_suffix(fmt: str) -> str:
    return ".jsonl" if fmt == REQUESTS else ".parquet"


def request_counts(entry_or_summary: dict[str, Any]) -> dict[str, int]:
    """OpenAI's request_counts (total, completed, failed) from rows and errors."""
    total, failed = entry_or_summary.get("rows", 0), entry_or_summary.get("errors", 0)
    return {"total": total, "completed": total - failed, "failed": failed}


__all__ = ["REQUESTS", "TABULAR", "companions", "output_name", "shard_format", "sink_for", "takes"]
