"""Shard discovery, slicing and the model checksum, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import UsageError
from jobs.output import checksum
from jobs.output.discovery import discover, inspect_shard, output_overlap, resolve
from jobs.output.plan import plan_units


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


def test_a_big_shard_is_sliced_by_row_groups_in_order(tmp_path):
    path = tmp_path / "big.parquet"
    shard(path, rows=250, row_group_size=100)  # row groups of 100, 100, 50
    fs, base = resolve(str(tmp_path))
    info = inspect_shard(fs, base, "big.parquet")
    assert info.identity["rows"] == 250 and info.row_groups == [100, 100, 50]
    units = plan_units("big.parquet", info, rows_per_unit=200)
    assert [(u.row_groups, u.rows, u.part, u.parts) for u in units] == [([0, 1], 200, 0, 2), ([2], 50, 1, 2)]
    assert [u.row_groups for u in plan_units("big.parquet", info, rows_per_unit=120)] == [[0], [1], [2]]
    assert len(plan_units("big.parquet", info, rows_per_unit=250)) == 1
    assert "not a Parquet file" in inspect_shard(fs, base, "missing.parquet").error


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
