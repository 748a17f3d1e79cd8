"""CSV and JSON Lines inputs through the real CLI (the same labels as the same rows in Parquet; files that are
not of their format refused before Ray starts, nothing written), the streaming readers on a 250,000-row CSV,
and the pipelines as callable classes in a real Ray Data `map_batches`."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.inputs import formats
from tests.jobs.conftest import classify, manifest_of, run_here


def rows_of(demo_root):
    return pq.read_table(demo_root / "input" / "part-00000.parquet")


def write_jsonl(table: pa.Table, path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


def labels(folder):
    table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    return {row["id"]: (row["label"], round(row["score"], 5)) for row in table.to_pylist()}


def test_csv_and_jsonl_inputs_give_the_labels_of_the_same_rows_in_parquet(ray_local, demo_root, tmp_path):
    model, table = demo_root / "model", rows_of(demo_root)
    texts = tmp_path / "texts"
    texts.mkdir()
    pacsv.write_csv(table.slice(0, 30), texts / "tickets.csv")
    write_jsonl(table.slice(30), texts / "events.jsonl")
    done = run_here(*classify(model, texts, tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["events.parquet", "tickets.parquet"]
    events = pq.read_table(tmp_path / "out" / "events.parquet")
    assert events.column_names[:2] == ["id", "text"]  # the file's column order, the text column a string
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    pq.write_table(table, parquet / "rows.parquet")
    assert run_here(*classify(model, parquet, tmp_path / "reference")).returncode == 0
    assert labels(tmp_path / "out") == labels(tmp_path / "reference")
    entry = manifest_of(tmp_path / "out")["shards"]["tickets.csv"]
    assert entry["rows"] == 30 and entry["output"] == "tickets.parquet"
    # a rerun is a no-op by the files' identity
    again = run_here(*classify(model, texts, tmp_path / "out"))
    assert again.returncode == 0 and "2 already committed" in again.stdout
    summary = manifest_of(tmp_path / "out")["summary"]  # the job's totals stay; this run did nothing
    assert summary["rows"] == table.num_rows and summary["run"]["rows"] == 0 and summary["done"] == 2


def test_input_format_reads_a_file_of_any_name_and_numbers_as_text(ray_local, demo_root, tmp_path):
    table = pa.table({"id": [1, 2, 3], "text": ["12", "3.5", "hello there,\nover two lines"]})
    pacsv.write_csv(table, tmp_path / "export.txt")
    out = tmp_path / "out"
    done = run_here(*classify(demo_root / "model", tmp_path / "export.txt", out, "--input-format", "csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    result = pq.read_table(out / "export.txt.parquet")
    assert result.column("text").to_pylist() == ["12", "3.5", "hello there,\nover two lines"]  # text, not numbers
    assert result.column("error").to_pylist() == [None] * 3


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b"id,text\n1,hello\n", "input bad.jsonl: not a JSON Lines file"),
    ("bad.csv", b'id,"text\n1,hello\n', "input bad.csv: not a CSV file"),  # a quote never closed
    ("twice.csv", b"id,text,text\n1,a,b\n", "input twice.csv: its header names 'text' more than once"),
    ("fake.parquet", b"id,text\n1,hello\n", "input fake.parquet: not a Parquet file"),
    ("other.csv", b"id,body\n1,hello\n", "text column 'text' not in other.csv; its columns are ['id', 'body']"),
])
def test_a_file_not_of_its_format_fails_before_ray_starts(demo_root, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    done = run_here(*classify(demo_root / "model", tmp_path / name, out))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_250000_row_csv_is_streamed_in_record_batches(tmp_path, monkeypatch):
    rows = 250_000
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": [f"ticket number {i}" for i in range(rows)]})
    path = tmp_path / "big.csv"
    pacsv.write_csv(table, path)
    assert path.stat().st_size > 4 * formats.READ_BLOCK  # several blocks
    with pa.OSFile(str(path)) as source:
        opened = formats.read_tabular(source, "csv", "text", 1024)
        sizes, ids = [], []
        for batch in opened.batches:
            sizes.append(batch.num_rows)
            ids += batch.column("id").to_pylist()[:1]
        assert max(sizes) <= 1024 and sum(sizes) == rows and len(sizes) >= rows // 1024
    assert ids == sorted(ids)
    # a block past the first whose values no longer fit the first block's types: a clear error, not a crash
    monkeypatch.setattr(formats, "CSV_BLOCK", formats.READ_BLOCK)  # blocks of 1 MiB: the file has several
    late = tmp_path / "late.csv"
    late.write_text("id,text\n" + "".join(f"{i},row {i}\n" for i in range(200_000)) + "oops,row\n")
    with pa.OSFile(str(late)) as source, pytest.raises(ValueError, match="not a valid CSV file past its start"):
        for _ in formats.read_tabular(source, "csv", "text", 1024).batches:
            pass


def test_ray_data_map_batches_equals_the_in_process_pipeline(ray_local, demo_root):
    import ray

    from pipelines import ClassificationPipeline, EmbeddingPipeline

    model, table = str(demo_root / "model"), rows_of(demo_root)
    ds = ray.data.from_arrow([table.slice(0, 20), table.slice(20, 20), table.slice(40)])  # three blocks
    labeled = ds.map_batches(ClassificationPipeline, fn_constructor_args=(model,), batch_format="pyarrow",
                             batch_size=16, concurrency=1).take_all()
    embedded = ds.map_batches(EmbeddingPipeline, fn_constructor_args=(model,), fn_constructor_kwargs={"normalize": True},
                              batch_format="pyarrow", concurrency=1).take_all()
    expected_labels = ClassificationPipeline(model)(table).to_pylist()
    expected = EmbeddingPipeline(model, normalize=True)(table).column("embedding").to_pylist()
    labeled, embedded = (sorted(rows, key=lambda r: r["id"]) for rows in (labeled, embedded))
    assert [r["id"] for r in labeled] == [r["id"] for r in embedded] == table.column("id").to_pylist()
    for row, want in zip(labeled, expected_labels):
        assert row["label"] == want["label"] and abs(row["score"] - want["score"]) < 1e-5
    for row, vector in zip(embedded, expected):
        assert max(abs(a - b) for a, b in zip(row["embedding"], vector)) < 1e-5


def test_request_lines_are_read_to_the_planned_size_and_an_overlong_line_is_held_short(tmp_path):
    """What is appended after planning is not read (the next run reads it); a line of 20 MB is held as its
    first MAX_LINE_BYTES + 1 bytes (enough for the pipeline to refuse it), and the lines after it are whole.
    Read as a job's worker opens a shard: open_source bounded by the planned size, then read_requests."""
    import pyarrow.fs as pafs

    from jobs.inputs.formats import open_source, read_requests
    from pipelines.schema import MAX_LINE_BYTES

    planned = b'{"a": 1}\n' + b"x" * (20 << 20) + b'\n{"b": 2}\n\n{"c": 3}'
    path = tmp_path / "requests.jsonl"
    path.write_bytes(planned + b'4}\n{"d": 4}\n')  # appended after planning: "c" would have become 34
    with open_source(pafs.LocalFileSystem(), str(path), limit=len(planned)) as source:
        table = pa.Table.from_batches(list(read_requests(source, batch_rows=2).batches))
    assert table.column("line").to_pylist() == [1, 2, 3, 5]  # the blank line 4 skipped
    lines = table.column("request").to_pylist()
    assert lines[0] == b'{"a": 1}' and lines[2] == b'{"b": 2}' and lines[3] == b'{"c": 3}'
    assert len(lines[1]) == MAX_LINE_BYTES + 1


def read_all(opened) -> pa.Table:
    """A reader's batches as one table (a batch without a row error has no INPUT_ERROR column; null there)."""
    return pa.concat_tables([pa.Table.from_batches([b]) for b in opened.batches], promote_options="default")


JSONL_POISON = {  # a line -> what its row's error says (None: the row is read, as documented)
    b'{"id": 101, "text": "caf\xe9 au lait"}': "not valid UTF-8",
    b'{"id": 102, "text": "unterminated': "not JSON",
    b'{"id": 103, "text": 12}': None,  # a number is its text, "12"
    b'{"id": 104, "text": ["a", "list"]}': "is a JSON list, not text",
    b'{"id": "one hundred five", "text": "an id of another type"}': None,  # that value null, the text kept
    b'{"id": 106, "title": "a line without the text key"}': "has no 'text' key",
    b'[1, 2, 3]': "is a JSON list, not an object",
    b'{"id": 107, "text": "' + b"long " * (4 << 20) + b'"}': "longer than the",
}


def test_jsonl_rows_each_keep_their_own_problem(tmp_path):
    """Reading alone (no model): each poison line is its own row's INPUT_ERROR, the good rows around it read as
    they would without it, in order."""
    import io

    from pipelines.schema import INPUT_ERROR

    good = [json.dumps({"id": i, "text": f"row {i}"}).encode() for i in range(5)]
    data = b"\n".join(good[:2] + list(JSONL_POISON) + good[2:]) + b"\n"
    opened = formats.read_tabular(io.BytesIO(data), "jsonl", "text", batch_rows=4)
    table = read_all(opened).to_pylist()
    assert len(table) == len(good) + len(JSONL_POISON)
    for row, expected in zip(table[2:-3], JSONL_POISON.values()):
        problem = row.get(INPUT_ERROR)
        assert (problem is None) if expected is None else (expected in problem), (row["id"], problem)
    assert [r["text"] for r in table[:2] + table[-3:]] == [f"row {i}" for i in range(5)]
    assert table[4]["text"] == "12" and table[6]["id"] is None and table[6]["text"] == "an id of another type"


def test_a_jsonl_line_without_the_text_key_says_so_and_a_null_text_is_null(tmp_path):
    """Lines that all parse (pyarrow reads the batch whole, a missing key as null): the line without the key
    is told apart from the line whose text is null."""
    import io

    from pipelines.schema import INPUT_ERROR

    data = b'{"id": 1, "text": "one"}\n{"id": 2, "title": "two"}\n{"id": 3, "text": null}\n{"id": 4, "text": "x"}\n'
    table = read_all(formats.read_tabular(io.BytesIO(data), "jsonl", "text", 8))
    assert table.column(INPUT_ERROR).to_pylist() == [None, "line 2 has no 'text' key", None, None]
    assert table.column("text").to_pylist() == ["one", None, None, "x"]


def test_a_jsonl_line_not_utf8_among_good_lines_is_its_rows_error_whatever_column_holds_the_byte(tmp_path):
    """pyarrow reads a batch of lines that all parse whole, without checking their strings: a bad byte in the
    text, or in another column, must still be its line's error (not a failed file, nor a corrupt output)."""
    import io

    import pyarrow.fs as pafs

    from pipelines.schema import INPUT_ERROR

    data = (b'{"id": 1, "text": "good", "tag": "t"}\n{"id": 2, "text": "bad \xff byte", "tag": "t"}\n'
            b'{"id": 3, "text": "fine", "tag": "bad \xfe"}\n{"id": 4, "text": "good too", "tag": "t"}\n')
    table = read_all(formats.read_tabular(io.BytesIO(data), "jsonl", "text", 8))
    problems = table.column(INPUT_ERROR).to_pylist()
    assert problems[0] is None and problems[3] is None
    assert "line 2 is not valid UTF-8" in problems[1] and "line 3 is not valid UTF-8" in problems[2]
    assert table.column("id").to_pylist() == [1, None, None, 4]
    table.validate(full=True)  # every string valid: what is written can be read back
    # a first line longer than the first block read to find the columns (a valid row: under 16 MiB)
    long = tmp_path / "long.jsonl"
    long.write_bytes(b'{"id": 1, "text": "' + b"w " * (1 << 20) + b'"}\n{"id": 2, "text": "small"}\n')
    assert formats.inspect_text_file(pafs.LocalFileSystem(), str(long), "jsonl", "text")[0] == ["id", "text"]


@pytest.mark.parametrize("content", [b"id,text", b"id,text\r\n", b"id,text\n"])
def test_a_csv_of_a_header_alone_is_a_shard_of_no_rows(tmp_path, content):
    import io

    import pyarrow.fs as pafs

    path = tmp_path / "header.csv"
    path.write_bytes(content)
    assert formats.inspect_text_file(pafs.LocalFileSystem(), str(path), "csv", "text") == (["id", "text"], 0)
    opened = formats.read_tabular(io.BytesIO(content), "csv", "text", 8)
    assert opened.schema.names == ["id", "text"] and sum(b.num_rows for b in opened.batches) == 0


def test_csv_rows_of_the_wrong_field_count_are_their_rows_errors_in_their_places():
    """A row with more or fewer fields than the header is left out by the reader; it comes back in its place
    as a row whose error names it (its number among the rows, values spanning lines included). Blank lines
    are not rows. Small blocks, so rows are placed across block ends."""
    import io

    from pipelines.schema import INPUT_ERROR

    lines, expected = [b"id,text"], []
    for i in range(3000):
        if i % 97 == 5:
            lines.append(b'%d,"spans\r\ntwo lines",extra' % i)  # 3 fields, over two lines
            expected.append(("error", None))
        elif i % 89 == 7:
            lines.append(b"%d" % i)  # 1 field
            expected.append(("error", None))
        elif i % 83 == 3:
            lines.append(b"")  # a blank line: not a row
        elif i % 71 == 9:
            lines.append(b",")  # a row of empty fields: a row (its empty text is its error downstream)
            expected.append(("empty", None))
        else:
            lines.append(b'%d,"row %d\nsecond line"' % (i, i) if i % 5 == 0 else
                         b'%d,"row %d\r\nsecond line"' % (i, i) if i % 7 == 0 else b"%d,row %d" % (i, i))
            expected.append(("row", i))
    data = b"\n".join(lines) + b"\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats, "CSV_BLOCK", 4096)
        table = read_all(formats.read_tabular(io.BytesIO(data), "csv", "text", 256))
    got = table.to_pylist()
    assert len(got) == len(expected)
    for number, (row, (kind, value)) in enumerate(zip(got, expected), start=1):  # data rows, blank lines none
        if kind == "row":
            assert row["id"] == value and row[INPUT_ERROR] is None, row
        elif kind == "empty":
            assert row["id"] is None and row["text"] == b"" and row[INPUT_ERROR] is None, row
        else:
            assert row["id"] is None and row["text"] is None, row
            assert row[INPUT_ERROR].startswith(f"row {number} after the header has "), row
            assert "where the header has 2" in row[INPUT_ERROR]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank lines"])
def test_an_empty_text_file_reads_as_no_rows_with_the_text_column(content, fmt):
    import io

    opened = formats.read_tabular(io.BytesIO(content), fmt, "text", batch_rows=4)
    assert opened.schema.names == ["text"] and list(opened.batches) == []


def test_bad_csv_and_jsonl_rows_are_their_rows_errors_through_the_cli(ray_local, demo_root, tmp_path):
    """A latin-1 byte in a CSV text cell, a 3 MB cell, a row of three fields, and the JSON Lines poison rows:
    each its row's error
    (or its documented reading), every other row classified as in Parquet, exit 0."""
    model, table = demo_root / "model", rows_of(demo_root).slice(0, 12)
    texts = tmp_path / "texts"
    texts.mkdir()
    body = io_csv(table)
    body += b'900,"caf\xe9 au lait"\n901,"' + b"long " * (600 << 10) + b'"\n902,"one field too many",x\n'
    body += b'903,"the last row"\n'
    (texts / "tickets.csv").write_bytes(body)
    lines = [json.dumps(r).encode() for r in table.to_pylist()]
    (texts / "events.jsonl").write_bytes(b"\n".join(lines[:6] + list(JSONL_POISON) + lines[6:]) + b"\n")
    (texts / "quiet.jsonl").write_bytes(b"\n\n")  # blank lines only: no rows, not a failed file
    out = tmp_path / "out"
    done = run_here(*classify(model, texts, out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert pq.read_table(out / "quiet.parquet").num_rows == 0
    tickets = pq.read_table(out / "tickets.parquet").to_pylist()
    assert [r["error"] for r in tickets[:12]] == [None] * 12
    assert "not valid UTF-8" in tickets[12]["error"] and tickets[12]["text"] is None
    assert tickets[13]["error"] is None and len(tickets[13]["text"]) == 5 * (600 << 10)
    assert "has 3 fields where the header has 2" in tickets[14]["error"] and tickets[14]["id"] is None
    assert tickets[15]["id"] == 903 and tickets[15]["error"] is None and len(tickets) == 16
    assert pq.read_table(out / "tickets.parquet").schema.field("text").type == pa.string()
    events = pq.read_table(out / "events.parquet")
    assert "_input_error" not in events.column_names
    rows = events.to_pylist()
    assert len(rows) == 12 + len(JSONL_POISON)
    for row, expected in zip(rows[6:-6], JSONL_POISON.values()):
        assert (row["error"] is None) if expected is None else (expected in row["error"]), row["error"]
    good = [r for i, r in enumerate(rows) if i < 6 or i >= 6 + len(JSONL_POISON)]
    reference = {r["id"]: (r["label"], round(r["score"], 5)) for r in good}
    assert reference == {k: v for k, v in labels_of_table(model, table, tmp_path).items()}


def io_csv(table: pa.Table) -> bytes:
    import io

    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()


def labels_of_table(model, table, tmp_path):
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    pq.write_table(table, parquet / "rows.parquet")
    assert run_here(*classify(model, parquet, tmp_path / "reference")).returncode == 0
    return labels(tmp_path / "reference")


def test_compressed_inputs_equal_the_plain_files_and_a_delimiter_is_an_option(ray_local, demo_root, tmp_path):
    import bz2
    import gzip

    model, table = demo_root / "model", rows_of(demo_root).slice(0, 20)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    csv = io_csv(table)
    jsonl = "".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode()
    (plain / "a.csv").write_bytes(csv)
    (plain / "b.jsonl").write_bytes(jsonl)
    (packed / "a.csv.gz").write_bytes(gzip.compress(csv))
    (packed / "b.jsonl.bz2").write_bytes(bz2.compress(jsonl))
    for folder in (plain, packed):
        done = run_here(*classify(model, folder, tmp_path / f"out-{folder.name}"))
        assert done.returncode == 0, done.stdout + done.stderr
    for name in ("a.parquet", "b.parquet"):
        assert pq.read_table(tmp_path / "out-packed" / name).equals(pq.read_table(tmp_path / "out-plain" / name))
    semicolons = tmp_path / "semi"
    semicolons.mkdir()
    options = pacsv.WriteOptions(delimiter=";")
    pacsv.write_csv(table, semicolons / "s.csv", options)
    done = run_here(*classify(model, semicolons, tmp_path / "out-semi", "--csv-delimiter", ";"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert pq.read_table(tmp_path / "out-semi" / "s.parquet").column("label").equals(
        pq.read_table(tmp_path / "out-plain" / "a.parquet").column("label"))


def test_a_compressed_file_cut_short_fails_alone_once_with_a_plain_reason(ray_local, demo_root, tmp_path):
    """.jsonl.gz files whose end is missing (copies cut off): one cut inside its first block (refused when the
    run plans), one cut further on (met by the worker part way through). Each fails at once (another attempt
    would meet the same bytes), saying what is wrong; the whole file is committed."""
    import gzip

    model, table = demo_root / "model", rows_of(demo_root).slice(0, 20)
    folder = tmp_path / "in"
    folder.mkdir()
    rows = table.to_pylist()
    small = "".join(json.dumps(r) + "\n" for r in rows).encode()
    # rows with 200 KB of random hex beside their text: about 5 rows to the first (1 MiB) block
    big = "".join(json.dumps({**r, "pad": os.urandom(100_000).hex()}) + "\n" for r in rows).encode()
    (folder / "early.jsonl.gz").write_bytes(gzip.compress(small * 50)[:200])
    packed = gzip.compress(big)
    (folder / "late.jsonl.gz").write_bytes(packed[: len(packed) * 3 // 4])
    (folder / "whole.jsonl.gz").write_bytes(gzip.compress(small))
    out = tmp_path / "out"
    done = run_here(*classify(model, folder, out))
    assert done.returncode == 1, done.stdout + done.stderr
    shards = json.loads((out / "_manifest.json").read_text())["shards"]
    for name, attempts in (("early.jsonl.gz", 0), ("late.jsonl.gz", 1)):
        failed = [line for line in done.stdout.splitlines() if line.startswith(f"failed: {name}")]
        assert len(failed) == 1 and "its compressed data is cut short or corrupt" in failed[0], done.stdout
        assert shards[name]["state"] == "failed" and shards[name]["attempts"] == attempts, shards[name]
    assert pq.read_table(out / "whole.parquet").num_rows == 20
    assert not (out / "early.parquet").exists() and not (out / "late.parquet").exists()


def test_two_inputs_with_one_output_name_are_refused_before_any_work(demo_root, tmp_path):
    table = rows_of(demo_root).slice(0, 5)
    folder = tmp_path / "in"
    folder.mkdir()
    pacsv.write_csv(table, folder / "a.csv")
    pq.write_table(table, folder / "a.parquet")
    out = tmp_path / "out"
    done = run_here(*classify(demo_root / "model", folder, out))
    assert done.returncode == 2 and "input shards a.csv and a.parquet would both write output a.parquet" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
