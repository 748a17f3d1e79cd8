"""Shard discovery, slicing and the model checksum, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import UsageError
from jobs.inputs import checksum
from jobs.inputs.discovery import discover, inspect_shard, output_overlap
from jobs.output.paths import resolve
from jobs.execution.worker import rows_of
from jobs.planning.units import plan_units, units_for_actors


def shard(path: Path, rows: int = 3, row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(rows)), "text": ["x"] * rows}), path, row_group_size=row_group_size)


def test_discovery_takes_existing_paths_literally_and_globs_by_segment(tmp_path):
    literal = tmp_path / "run[1]"
    shard(literal / "a.parquet")
    shard(literal / "sub" / "b.parquet")
    (literal / "notes.txt").write_text("x")
    shard(literal / "_tmp.parquet")
    shard(literal / ".hidden" / "c.parquet")
    found = discover(str(literal))
    assert found.shards == ["a.parquet", "sub/b.parquet"] and found.skipped == 3 and found.kind == "directory"

    shard(tmp_path / "run1" / "x.parquet")  # what run[1] matches as a glob
    shard(tmp_path / "run1" / "deeper" / "y.parquet")
    assert discover(str(literal)).shards == ["a.parquet", "sub/b.parquet"]  # it exists: taken literally
    assert discover(f"{tmp_path}/run1/*.parquet").shards == ["x.parquet"]  # * stays in its folder
    assert discover(f"{tmp_path}/run1/**/*.parquet").shards == ["deeper/y.parquet", "x.parquet"]
    assert discover(f"{tmp_path}/run[1]/*.parquet").shards == ["run1/x.parquet"]  # no such path: a glob
    assert discover(f"{tmp_path}/run?/*.parquet").shards == ["run1/x.parquet"]
    with pytest.raises(UsageError, match="does not exist"):
        discover(str(tmp_path / "nothing-here"))


def test_the_output_tree_is_never_input(tmp_path):
    shard(tmp_path / "data" / "a.parquet")
    shard(tmp_path / "data" / "scored" / "a.parquet")  # an earlier run's output inside the input
    fs, out = resolve(str(tmp_path / "data" / "scored"))
    found = discover(f"{tmp_path}/data/**/*.parquet", output=(fs, out))
    assert found.shards == ["a.parquet"]
    assert "overlaps the input" in output_overlap(discover(str(tmp_path / "data")), fs, out)
    assert output_overlap(found, fs, out) is None  # a glob's output beside its matches: allowed
    # an input inside the output folder is not excluded
    assert discover(out, output=(fs, str(tmp_path / "data"))).shards == ["a.parquet"]


def texts(path: Path, lengths: list[int], row_group_size: int | None = None) -> None:
    """A shard whose row i has a text of lengths[i] characters (and id i)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{i:06d}" + "y" * (n - 6) for i, n in enumerate(lengths)]  # distinct: no dictionary to shrink them
    pq.write_table(pa.table({"id": list(range(len(lengths))), "text": rows}), path, row_group_size=row_group_size,
                   compression="none")


def read_unit(path: Path, unit) -> list[int]:
    """The ids a worker reads for `unit` (the same reader and slicing as UnitWorker._run)."""
    batches = pq.ParquetFile(path).iter_batches(batch_size=7, row_groups=unit.row_groups)
    if unit.row_groups is not None:
        batches = rows_of(batches, unit.skip, unit.rows)
    return [i for b in batches for i in b.column("id").to_pylist()]


def test_a_shard_is_cut_at_row_group_boundaries_where_close_and_inside_a_group_where_not(tmp_path):
    path = tmp_path / "big.parquet"
    texts(path, [20] * 250, row_group_size=100)  # row groups of 100, 100, 50
    fs, base = resolve(str(tmp_path))
    info = inspect_shard(fs, base, "big.parquet", text_column="text")
    assert info.identity["rows"] == 250 and info.row_groups == [100, 100, 50]
    assert len(info.group_bytes) == 3 and info.group_bytes[0] > info.group_bytes[2] > 0
    # over the row cap: two units of equal rows; the boundary at 100 is 20% of a unit away from the middle,
    # too far to move the cut there, so the first unit ends 25 rows into the second group
    units = plan_units("big.parquet", info, rows_per_unit=200)
    assert [(u.row_groups, u.skip, u.rows, u.part, u.parts) for u in units] == [([0, 1], 0, 125, 0, 2),
                                                                                ([1, 2], 25, 125, 1, 2)]
    # a cut close to a boundary moves to it: 210 rows in groups of 100 and 110, cut at 105 -> 100
    texts(tmp_path / "near.parquet", [20] * 210, row_group_size=100)
    near = inspect_shard(fs, base, "near.parquet", text_column="text")
    assert [(u.row_groups, u.skip, u.rows) for u in plan_units("near.parquet", near, rows_per_unit=120)] == \
        [([0], 0, 100), ([1, 2], 0, 110)]
    # four parts by text: every row read once, in order, across units that start inside row groups
    units = plan_units("big.parquet", info, rows_per_unit=10_000, parts=4)
    assert sum(u.rows for u in units) == 250 and len(units) == 4
    assert [i for u in units for i in read_unit(path, u)] == list(range(250))
    assert any(u.skip for u in units)
    assert len(plan_units("big.parquet", info, rows_per_unit=250)) == 1
    # never under min_rows rows per unit, but the row cap wins over it
    assert len(plan_units("big.parquet", info, rows_per_unit=10_000, parts=10, min_rows=100)) == 2
    assert len(plan_units("big.parquet", info, rows_per_unit=50, parts=1, min_rows=100)) == 5
    assert "not a Parquet file" in inspect_shard(fs, base, "missing.parquet").error
    # text-balanced cuts over rows of very uneven length never leave a unit under min_rows rows (found by a
    # trial: 51 rows in groups of 17, the first group's texts 8x longer, gave units of 7, 7 and 37 rows)
    texts(tmp_path / "uneven.parquet", [160] * 17 + [20] * 34, row_group_size=17)
    uneven = inspect_shard(fs, base, "uneven.parquet", text_column="text")
    for parts, floor in ((3, 16), (8, 16), (8, 5), (20, 2)):
        units = plan_units("uneven.parquet", uneven, rows_per_unit=10_000, parts=parts, min_rows=floor)
        assert all(u.rows >= floor for u in units) and sum(u.rows for u in units) == 51, [u.rows for u in units]
        assert [i for u in units for i in read_unit(tmp_path / "uneven.parquet", u)] == list(range(51))
    # the cuts move rather than parts merge: as many units as the rows allow
    assert len(plan_units("uneven.parquet", uneven, rows_per_unit=10_000, parts=3, min_rows=16)) == 3


def test_units_balance_text_across_row_groups_and_rows_within_one(tmp_path):
    fs, base = resolve(str(tmp_path))
    lengths = [10] * 1200 + [100] * 400  # the last quarter of the rows holds three quarters of the text
    texts(tmp_path / "groups.parquet", lengths, row_group_size=100)
    info = inspect_shard(fs, base, "groups.parquet", text_column="text")
    units = plan_units("groups.parquet", info, rows_per_unit=10_000, parts=4)
    got = [read_unit(tmp_path / "groups.parquet", u) for u in units]
    assert [i for ids in got for i in ids] == list(range(1600))
    text_per_unit = [sum(lengths[i] for i in ids) for ids in got]
    assert max(text_per_unit) < 1.3 * min(text_per_unit), text_per_unit  # by text, not by rows
    assert len(got[0]) > 2 * len(got[3])
    # one row group: the footer says nothing of where its text is, so its rows are cut evenly
    lengths = [10] * 300 + [100] * 100
    texts(tmp_path / "one.parquet", lengths)
    info = inspect_shard(fs, base, "one.parquet", text_column="text")
    assert info.row_groups == [400]
    units = plan_units("one.parquet", info, rows_per_unit=10_000, parts=4)
    assert [(u.row_groups, u.skip, u.rows, u.part) for u in units] == [([0], 100 * p, 100, p) for p in range(4)]
    assert [i for u in units for i in read_unit(tmp_path / "one.parquet", u)] == list(range(400))


def test_units_sized_to_the_pool(tmp_path):
    fs, base = resolve(str(tmp_path))

    def infos(names_lengths, row_group_size=None):
        out = []
        for name, lengths in names_lengths:
            texts(tmp_path / name, lengths, row_group_size)
            out.append((name, inspect_shard(fs, base, name, text_column="text")))
        return out

    # many similar shards: one unit each, whatever the pool
    similar = infos([(f"s{i:02d}.parquet", [30] * 40) for i in range(24)])
    assert [u.parts for u in units_for_actors(similar, 2, 200_000, 8)] == [1] * 24
    # three large files on eight actors: about three units per actor, none idle from the start
    large = infos([(f"l{i}.parquet", [30] * 1500) for i in range(3)], row_group_size=500)
    units = units_for_actors(large, 8, 200_000, 16)
    assert len(units) == 24 and {u.parts for u in units} == {8}
    assert sorted((u.shard, u.part) for u in units) == sorted((f"l{i}.parquet", p) for i in range(3) for p in range(8))
    # one actor: whole shards
    assert len(units_for_actors(large, 1, 200_000, 16)) == 3
    # very unequal: the big one is split, the small ones stay whole, longest first
    unequal = infos([("big.parquet", [30] * 3000)] + [(f"small{i}.parquet", [30] * 100) for i in range(7)])
    units = units_for_actors(unequal, 2, 200_000, 16)
    big = [u for u in units if u.shard == "big.parquet"]
    assert len(big) >= 4 and all(u.parts == 1 for u in units if u.shard != "big.parquet")
    assert [u.work for u in units] == sorted((u.work for u in units), reverse=True)
    # text, not rows: as many rows of ten times the text are split more
    wordy = infos([("short.parquet", [10] * 1000), ("long.parquet", [100] * 1000)])
    parts = {u.shard: u.parts for u in units_for_actors(wordy, 4, 200_000, 16)}
    assert parts["long.parquet"] > 3 * parts["short.parquet"]


def test_model_checksum_covers_every_byte_and_rereads_only_changed_files(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(os.urandom(5 << 20))
    cache = tmp_path / "cache"
    reads = []
    real = checksum.file_digest
    monkeypatch.setattr(checksum, "file_digest", lambda f: reads.append(f.name) or real(f))
    first = checksum.model_checksum(model, checksum.DigestCache(cache))
    assert sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert checksum.model_checksum(model, checksum.DigestCache(cache)) == first and reads == []  # cached
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    weights.write_bytes(bytes(data))
    assert checksum.model_checksum(model, checksum.DigestCache(cache)) != first and reads == ["model.safetensors"]


def test_a_units_failure_reason_is_one_line_however_the_exception_was_worded():
    """What the manifest records and the summary prints for a failed unit: one line (an exception from pyarrow
    or a library may span lines), its type named, the permanence and fatality rules kept."""
    from jobs.errors import ModelChanged
    from jobs.execution.dispatcher import Fatal
    from jobs.execution.worker import failed

    bad = failed(ValueError("not a Parquet file:\n  magic bytes\tnot found\n"), "input a.parquet: ")
    assert bad.error == "input a.parquet: ValueError: not a Parquet file:; magic bytes not found" and bad.permanent
    full = failed(OSError(28, "No space left on device\nwhile writing"), "output: ")
    assert full.fatal == Fatal.OUTPUT_UNWRITABLE and "\n" not in full.error
    changed = failed(ModelChanged("the model changed on disk:\nmodel.safetensors"))
    assert changed.fatal == Fatal.MODEL_CHANGED and changed.error == "the model changed on disk:; model.safetensors"
