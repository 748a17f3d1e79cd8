"""Input file formats: which format a shard is and how it is read as record batches (what its output is called
and how it is written: jobs/output/sinks.py).

Tabular inputs are Parquet, CSV or JSON Lines, by suffix (`.parquet`; `.csv`; `.jsonl`, `.ndjson`) or as the job
says (`--input-format`); a file of another suffix given by name is Parquet, as before. Their output is
Parquet, named after the input with its suffix replaced (`tickets.csv` -> `tickets.parquet`). CSV and JSON Lines
are read one block at a time, so a big file never sits in memory whole; they carry no row count or row groups,
so such a shard is one work unit and its row count is an estimate (from the first block) until it is done. Any of
them may be compressed (`.gz`, `.bz2`, `.zst` after the format's suffix: `tickets.csv.gz`), read as a stream.

A row's problem is that row's error, never its file's: a CSV text cell that is not UTF-8 (the text column is
read as bytes), a JSON line that is not UTF-8 or not JSON, longer than MAX_ROW_BYTES, or whose values do not
fit the columns the file began with (a number where the text column had strings is its text, "12"). JSON Lines
are parsed by pyarrow a batch of lines at a time; a batch that does not parse is parsed line by line, and the
lines that fail carry their message in the INPUT_ERROR column, which the pipelines read as the row's error.
Only what makes the whole file unreadable fails it, and a file is read only to the size it was planned at.

`openai-batch` reads OpenAI batch request files (`.jsonl`, one request per line) and writes two JSON Lines
files per input: the responses under the input's name and the failed lines beside it (`x.errors.jsonl`).
JSON Lines carry no metadata, so a run recognises its own committed pair by the journal record written
before the files are moved into place (manifest.py), not by the files' contents.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from persimmon.kinds import Kind
from pipelines.errors import one_line
from pipelines.schema import INPUT_ERROR, MAX_LINE_BYTES

from ..errors import UsageError


class Format(Kind):
    """An input file's format (its value wherever it is stored: a job file's "csv" is Format.CSV)."""

    PARQUET = "parquet"
    CSV = "csv"
    JSONL = "jsonl"
    REQUESTS = "openai"  # OpenAI batch request lines (openai-batch)


TABULAR = (Format.PARQUET, Format.CSV, Format.JSONL)  # what --input-format may name
REQUESTS = Format.REQUESTS
SUFFIXES = {".parquet": Format.PARQUET, ".csv": Format.CSV, ".jsonl": Format.JSONL, ".ndjson": Format.JSONL}
ERRORS_SUFFIX = ".errors.jsonl"
NAMES = {Format.PARQUET: "Parquet", Format.CSV: "CSV", Format.JSONL: "JSON Lines", REQUESTS: "OpenAI batch request"}
READ_BLOCK = 1 << 20  # bytes per block of the readers
CSV_BLOCK = 64 << 20  # bytes per block of the CSV reader: a CSV row must fit in one
MAX_ROW_BYTES = 16 << 20  # a longer JSON line is its row's error
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
REQUEST_COLUMNS = pa.schema([("line", pa.int64()), ("request", pa.binary())])


DECOMPRESSION = ("compressed", "inflate", "decompress")  # how pyarrow's codecs word data they cannot decode


def compression_problem(exc: BaseException, name: str) -> str | None:
    """What is wrong with a compressed file whose codec failed (cut short, corrupt), or None where `exc` is not
    that (a network read that failed may succeed another time)."""
    if isinstance(exc, OSError) and compression_of(name) and any(word in str(exc) for word in DECOMPRESSION):
        return f"its compressed data is cut short or corrupt ({one_line(exc, 200)})"
    return None


def suffix_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[1].lower() if "." in base else ""


def compression_of(name: str) -> str | None:
    """The codec of a compressed file (by its last suffix), or None."""
    return COMPRESSIONS.get(suffix_of(name))


def plain_name(name: str) -> str:
    """The name without its compression suffix (`a.csv.gz` -> `a.csv`)."""
    return name[: -len(suffix_of(name))] if compression_of(name) else name


def shard_format(shard: str, forced: str | None = None) -> Format:
    """The format of a shard: the job's (--input-format, or openai-batch's request files), else by suffix (of the
    name without a compression suffix)."""
    if forced:
        return Format(forced)
    return SUFFIXES.get(suffix_of(plain_name(shard)), Format.PARQUET)


def takes(name: str, forced: str | None) -> bool:
    """Whether a file found in an input folder is input: of a known tabular suffix, or (with a format given)
    any file, or for openai-batch a `.jsonl` that is not one of our own error files."""
    plain = plain_name(name)
    if forced == REQUESTS:
        return suffix_of(plain) == ".jsonl" and not plain.endswith(ERRORS_SUFFIX)
    return forced is not None or suffix_of(plain) in SUFFIXES


def format_problem(name: object) -> str | None:
    """The one rule for the format a job names (None: by each file's suffix): a tabular format's name."""
    if name is None or name in TABULAR:
        return None
    from pipelines.options import did_you_mean

    names = [f.value for f in TABULAR]
    return f"input_format: expected one of {names}, got {name!r}{did_you_mean(str(name), names)}"


def check_format(name: str | None) -> Format | None:
    """The tabular format a job names (None: by suffix); UsageError for another name."""
    problem = format_problem(name)
    if problem:
        raise UsageError(problem)
    return None if name is None else Format(name)


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


def open_source(fs: pafs.FileSystem, path: str, limit: int | None = None):
    """A shard's bytes as a stream: decompressed when its name says it is compressed, and never past `limit`
    bytes of the file (the size it was planned at: what is appended while it is read is the next run's)."""
    codec = compression_of(path)
    if codec is None and limit is None:
        return fs.open_input_file(path)
    raw = fs.open_input_stream(path, compression=None)  # decompressed below, after the bound on the file's bytes
    if limit is not None:
        raw = pa.PythonFile(_Bounded(raw, limit), mode="r")
    return pa.CompressedInputStream(raw, codec) if codec else raw


class _Bounded(io.RawIOBase):
    """The first `limit` bytes of a stream."""

    def __init__(self, raw, limit: int) -> None:
        self.raw, self.left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(min(len(buffer), self.left)) if self.left > 0 else b""
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Replay(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream (a reader that must look ahead on a stream
    that cannot seek back)."""

    def __init__(self, head: bytes, rest) -> None:
        self.head, self.rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if len(self.head):
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_csv(source, text_column: str | None, delimiter: str = ",", block: int | None = None,
             invalid=None):
    """pyarrow's streaming CSV reader. `invalid(row)` is called for each row whose field count is not the
    header's, which is then left out; without it those are left out silently (reading the columns only).
    Blank lines are not rows."""
    import pyarrow.csv as pacsv

    # the text column is read as bytes, so a cell that is not UTF-8 is that row's error (pipelines decode it)
    types = {text_column: pa.binary()} if text_column else {}

    def handler(row) -> str:
        if invalid is not None:
            invalid(row)
        return "skip"

    # newlines_in_values: a quoted text may span lines (tickets, documents), at some cost in parsing speed.
    # One thread: the reader then numbers each row it leaves out, which places it among the others (_CsvRows).
    return pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=block or CSV_BLOCK, use_threads=False),
                          parse_options=pacsv.ParseOptions(newlines_in_values=True, delimiter=delimiter,
                                                           invalid_row_handler=handler),
                          convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))


class HeaderProblem(ValueError):
    """A CSV file that is a CSV file, but whose header the job cannot take (said as it is, not as "not a CSV")."""


def _header(names: list[str]) -> list[str]:
    """A CSV header's column names; HeaderProblem where one is named twice (its output could not be read back)."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise HeaderProblem(f"its header names {', '.join(map(repr, twice))} more than once")
    return names


class _CsvRows:
    """A CSV file's record batches with the rows the reader left out (a field count not the header's) put
    back in their places as rows of nulls whose INPUT_ERROR says what was wrong.

    The reader numbers a left-out row by its place among the rows it parsed, the header being the first (a
    row whose values span lines is one; blank lines are none); the kept rows are counted alongside."""

    def __init__(self, source, text_column: str | None, delimiter: str) -> None:
        self.skipped: list[tuple[int, int, int, str]] = []  # (data row index, fields, header's, text), in order
        self.reader = open_csv(source, text_column, delimiter, invalid=self._skip)
        self.schema = self.reader.schema
        _header(self.schema.names)
        self.row = 0  # the index of the next data row, kept or left out

    def _skip(self, row) -> None:
        self.skipped.append((row.number - 2 if row.number is not None else -1, row.actual_columns,
                             row.expected_columns, row.text))

    def batches(self) -> Iterator[pa.RecordBatch]:
        for batch in _blocks(self.reader, Format.CSV):
            yield self._placed(batch)
        if self.skipped:  # left out after the last kept row
            yield self._placed(pa.RecordBatch.from_pylist([], schema=self.schema))

    def _placed(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not self.skipped or self.skipped[0][0] > self.row + batch.num_rows:
            self.row += batch.num_rows  # nothing left out among these rows
            return batch
        order: list[int] = []  # indices into the batch's rows, then into the error rows after them
        errors: list[str | None] = []
        problems: list[str] = []

        def take_skipped(last: bool) -> None:
            while self.skipped and (last or self.skipped[0][0] <= self.row):
                index, fields, expected, text = self.skipped.pop(0)
                self.row += 1
                if not text.strip():
                    continue  # a line of spaces: blank, as the reader takes an empty line
                shown = text if len(text) <= 60 else text[:57] + "..."
                problems.append(f"row {index + 1} after the header has {fields} field{'s' * (fields != 1)} where "
                                f"the header has {expected} ({shown!r})")
                order.append(batch.num_rows + len(problems) - 1)
                errors.append(problems[-1])

        for i in range(batch.num_rows):
            take_skipped(False)
            order.append(i)
            errors.append(None)
            self.row += 1
        take_skipped(not batch.num_rows)
        nulls = pa.RecordBatch.from_arrays([pa.nulls(len(problems), f.type) for f in self.schema], schema=self.schema)
        table = pa.Table.from_batches([batch, nulls], schema=self.schema).take(order)
        table = table.append_column(pa.field(INPUT_ERROR, pa.string()), pa.array(errors, pa.string()))
        return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=table.schema)


def text_as_string(table: pa.Table, text_column: str | None) -> pa.Table:
    """An output table with the text column back as strings (CSV reads it as bytes): a cell that is not UTF-8
    is null there, its row's error saying why."""
    if text_column is None or text_column not in table.column_names:
        return table
    index = table.column_names.index(text_column)
    column = table.column(index)
    if not pa.types.is_binary(column.type):
        return table
    try:
        text = column.cast(pa.string())
    except pa.ArrowInvalid:
        values = []
        for raw in column.to_pylist():
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
        text = pa.array(values, pa.string())
    return table.set_column(index, pa.field(text_column, pa.string()), text)


def read_tabular(source, fmt: str, text_column: str | None, batch_rows: int, delimiter: str = ",") -> Opened:
    """A CSV or JSON Lines shard as record batches; ValueError (pyarrow's ArrowInvalid) when it is not one."""
    if fmt == Format.CSV:
        head = source.read(READ_BLOCK)
        if not head.strip():  # empty or blank: no rows, and an (empty) output like any other file's
            return Opened(pa.schema([(text_column, pa.string())] if text_column else []), iter(()), {})
        if b"\n" not in head and b"\r" not in head:  # a header alone, without its line end (pyarrow: "empty")
            head += b"\n"
        rows = _CsvRows(_Replay(head, source), text_column, delimiter)
        return Opened(rows.schema, _rebatch(rows.batches(), batch_rows), {})
    return read_json_lines(source, text_column, batch_rows)


def read_json_lines(source, text_column: str | None, batch_rows: int) -> Opened:
    """JSON Lines as record batches of at most batch_rows rows, each row's problem its own (see the module's
    docstring). The columns are those of the first batch of lines, in the order its first object has them, the
    text column a string."""
    numbered = ((n, line) for n, line in enumerate(_lines(source, keep=MAX_ROW_BYTES), start=1) if line.strip())
    chunks = _chunks(numbered, batch_rows)
    first = next(chunks, [])
    if not first:  # empty, or blank lines only: no rows, and an (empty) output like any other file's
        return Opened(pa.schema([(text_column, pa.string())] if text_column else []), iter(()), {})
    schema = _json_schema([line for _, line in first], text_column)
    if schema is None:
        raise ValueError("no line of its first batch is a JSON object")

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in _prepend(first, chunks):
            yield from _json_chunk(chunk, schema, text_column).to_batches()

    return Opened(schema, batches(), {})


def _chunks(numbered, size: int):
    chunk = []
    for item in numbered:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prepend(first, rest):
    if first:
        yield first
    yield from rest


def _json_schema(lines: list[bytes], text_column: str | None) -> pa.Schema | None:
    """The columns of these lines (pyarrow's inference over the lines that parse), in the order the first
    object has them; the text column a string."""
    import pyarrow.json as pajson

    good, order = [], None
    for line in lines:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            good.append(line)
            order = order or list(value)
    if not good:
        return None
    parse = pajson.ParseOptions(explicit_schema=pa.schema([(text_column, pa.string())]),
                                unexpected_field_behavior="infer") if text_column else None
    try:
        inferred = _read_json(b"\n".join(good), parse).schema
    except pa.ArrowInvalid:  # the good lines disagree on a type: infer from the first one alone
        inferred = _read_json(good[0], parse).schema
    names = [n for n in order if n in inferred.names] + [n for n in inferred.names if n not in order]
    # a column only ever null in the first lines is text: later values keep their JSON text instead of being lost
    return pa.schema([inferred.field(n).with_type(pa.string()) if pa.types.is_null(inferred.field(n).type)
                      else inferred.field(n) for n in names])


def _read_json(data: bytes, parse) -> pa.Table:
    import pyarrow.json as pajson

    block = max(READ_BLOCK, len(data) + 1)
    return pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=block, use_threads=False),
                            parse_options=parse)


def _json_chunk(chunk: list[tuple[int, bytes]], schema: pa.Schema, text_column: str | None) -> pa.Table:
    """One batch of lines as a table of `schema`: parsed whole by pyarrow when it can, else line by line."""
    import pyarrow.json as pajson

    data = b"\n".join(line for _, line in chunk)
    if all(len(line) <= MAX_ROW_BYTES for _, line in chunk) and _utf8(data):
        try:
            table = _read_json(data, pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
            if table.num_rows == len(chunk):
                return _missing_text(table.select(schema.names), chunk, text_column)
        except pa.ArrowInvalid:
            pass
    rows, errors = [], []
    for number, line in chunk:
        row, error = _json_row(number, line, schema, text_column)
        rows.append(row)
        errors.append(error)
    table = pa.Table.from_pylist(rows, schema=schema)
    return table.append_column(pa.field(INPUT_ERROR, pa.string()), pa.array(errors, pa.string()))


def _utf8(data: bytes) -> bool:
    """Whether the bytes are UTF-8: pyarrow's JSON reader takes strings as they are, so a batch that is not
    is read line by line, each bad line its row's error (a bad byte in any column, not only the text)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _missing_text(table: pa.Table, chunk: list[tuple[int, bytes]], text_column: str | None) -> pa.Table:
    """The table with an INPUT_ERROR column where a line has no text key at all (pyarrow reads a missing key
    as null, which would be reported as a null text)."""
    if text_column is None or text_column not in table.column_names or not table.column(text_column).null_count:
        return table
    errors: list[str | None] = [None] * len(chunk)
    nulls = table.column(text_column).is_null().to_pylist()
    for i, (number, line) in enumerate(chunk):
        if not nulls[i]:
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and text_column not in value:
            errors[i] = f"line {number} has no {text_column!r} key"
    if not any(errors):
        return table
    return table.append_column(pa.field(INPUT_ERROR, pa.string()), pa.array(errors, pa.string()))


def _json_row(number: int, line: bytes, schema: pa.Schema, text_column: str | None) -> tuple[dict, str | None]:
    """One JSON line as a row of `schema` (values that do not fit a column are null) and its error, if any."""
    if len(line) > MAX_ROW_BYTES:
        return {}, f"line {number} is longer than the {MAX_ROW_BYTES:,} bytes a row may have"
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return {}, f"line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    except (ValueError, RecursionError) as exc:
        return {}, f"line {number} is not JSON ({one_line(exc, 200)})"
    if not isinstance(value, dict):
        return {}, f"line {number} is a JSON {type(value).__name__}, not an object"
    row, error = {}, None
    for field in schema:
        item = value.get(field.name)
        if field.name == text_column:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = json.dumps(item)  # a number is its text, as a whole-file read gives it
            elif item is not None and not isinstance(item, str):
                error = f"line {number}: {text_column!r} is a JSON {type(item).__name__}, not text"
                item = None
        if item is not None and pa.types.is_string(field.type) and not isinstance(item, str):
            item = json.dumps(item)  # a text column keeps any JSON value as its text
        if item is not None:
            try:
                pa.array([item], field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                item = None  # a value of another type than the column's: null, the rest of the row kept
        row[field.name] = item
    if error is None and text_column is not None and text_column not in value:
        error = f"line {number} has no {text_column!r} key"
    if error is None and isinstance(value.get(text_column), str):
        try:
            value[text_column].encode("utf-8")
        except UnicodeEncodeError:
            row[text_column], error = None, f"line {number}: the text holds a lone surrogate escape, not valid Unicode"
    return row, error


def _blocks(reader, fmt: Format) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:  # a later block that does not parse, or does not fit the first's types
            raise ValueError(f"not a valid {NAMES[fmt]} file past its start ({exc}); a column whose values "
                             "change type inside the file can be read after converting the file to Parquet") from None
        yield batch


def _lines(source, keep: int | None = None) -> Iterator[bytes]:
    """The lines of a binary stream (without their line ends), read one block at a time, in time linear in the
    stream's length however long a line is. Of a line longer than `keep` bytes only its first keep + 1 are held
    (enough to refuse it)."""
    pending: list[bytes] = []  # the pieces of a line that has not ended yet
    held = 0
    cut = None if keep is None else keep + 1
    while True:
        block = source.read(READ_BLOCK)
        if not block:
            break
        start = 0
        while True:
            end = block.find(b"\n", start)
            if end < 0:
                break
            if keep is None or held <= keep:
                pending.append(block[start:end])
            yield b"".join(pending)[:cut]
            pending.clear()
            held, start = 0, end + 1
        if start < len(block) and (keep is None or held <= keep):
            pending.append(block[start:])
            held += len(block) - start
    if pending:
        yield b"".join(pending)[:cut]


def read_requests(source, batch_rows: int) -> Opened:
    """An OpenAI batch file as record batches of (line number, the line's bytes); blank lines are skipped. A
    line longer than MAX_LINE_BYTES is held as its first MAX_LINE_BYTES + 1 bytes (the pipeline refuses it)."""
    def batches() -> Iterator[pa.RecordBatch]:
        numbers: list[int] = []
        lines: list[bytes] = []
        for number, line in enumerate(_lines(source, MAX_LINE_BYTES), start=1):
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


def inspect_text_file(fs: pafs.FileSystem, path: str, fmt: str, text_column: str | None,
                      delimiter: str = ",") -> tuple[list[str], int]:
    """(columns, estimated rows) of a CSV, JSON Lines or request file from its first block (decompressed where it
    is compressed); ValueError when it is not of its format."""
    size = fs.get_file_info(path).size or 0
    with open_source(fs, path) as f:
        head = f.read(READ_BLOCK)
        lines = head.count(b"\n") + (0 if head.endswith(b"\n") or not head else 1)
        scale = size / len(head) if head and not compression_of(path) else 1.0
        if fmt == REQUESTS:
            return [], round(lines * scale)
        if fmt == Format.JSONL:
            while b"\n" not in head and len(head) <= MAX_ROW_BYTES:  # a first line longer than a block
                more = f.read(READ_BLOCK)
                if not more:
                    break
                head += more
            complete = head[: head.rfind(b"\n")] if b"\n" in head and not head.endswith(b"\n") else head
            # the columns as the file has them (the text column is not added to a file that lacks it)
            schema = _json_schema([x for x in complete.split(b"\n") if x.strip()], None)
            if schema is None:
                if not head.strip():  # empty or blank: no rows, read as the text column alone (read_json_lines)
                    return [text_column] if text_column else [], 0
                raise ValueError("no line of its first block is a JSON object")
            return schema.names, round(lines * scale)
        if not head.strip():  # empty or blank: no rows, read as the text column alone (read_tabular)
            return [text_column] if text_column else [], 0
        if b"\n" not in head and b"\r" not in head:  # a header alone, without its line end (read_tabular)
            head += b"\n"
        try:
            reader = open_csv(_Replay(head, f), text_column, delimiter, block=READ_BLOCK)
            first = reader.read_next_batch()
        except StopIteration:
            return _header(reader.schema.names), 0
        except pa.ArrowInvalid as exc:
            if "straddling" not in str(exc):
                raise
            return _header(inspect_csv_whole_block(fs, path, text_column, delimiter)), 1
        return _header(reader.schema.names), max(first.num_rows, round(first.num_rows * scale))


def inspect_csv_whole_block(fs: pafs.FileSystem, path: str, text_column: str | None, delimiter: str) -> list[str]:
    """The columns of a CSV whose first rows are longer than a small block (read with the reader's own block)."""
    with open_source(fs, path) as f:
        return open_csv(f, text_column, delimiter).schema.names


__all__ = ["Format", "REQUESTS", "TABULAR", "shard_format", "takes"]
