"""CSV and JSON Lines inputs through the real CLI (the same labels as the same rows in Parquet; files that are
not of their format refused before Ray starts, nothing written), the streaming readers on a 250,000-row CSV,
and the pipelines as callable classes in a real Ray Data `map_batches`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.output import formats
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
    ("bad.jsonl", b"id,text\n1,hello\n", "input bad.jsonl is not a JSON Lines file"),
    ("bad.csv", b"id,text\n1,hello,extra,fields\n", "input bad.csv is not a CSV file"),
    ("fake.parquet", b"id,text\n1,hello\n", "input fake.parquet is not a Parquet file"),
    ("other.csv", b"id,body\n1,hello\n", "text column 'text' not in other.csv; its columns are ['id', 'body']"),
])
def test_a_file_not_of_its_format_fails_before_ray_starts(demo_root, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    done = run_here(*classify(demo_root / "model", tmp_path / name, out))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_250000_row_csv_is_streamed_in_record_batches(tmp_path):
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
