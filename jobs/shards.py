"""Input shards, work units, atomic output commits and the job manifest.

Input is a Parquet file, a directory of them or a glob, on any filesystem pyarrow knows (local, s3://,
gs://, hdfs://). Each input shard gets one output file of the same relative name. An attempt writes to a
unique temporary name under `_temporary/` and is committed by an atomic rename (object stores, where a
rename is a copy, write the final name directly: an object appears only once its upload completes). The
commit is then recorded in `_manifest.json`, itself replaced atomically; `_SUCCESS` appears when every
shard is committed. A shard committed but not yet recorded (the driver died in between) is recognised on
the next run by the fingerprint in its Parquet metadata and adopted without being recomputed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
TEMPORARY = "_temporary"
META_FINGERPRINT = b"persimmon_batch.fingerprint"
META_INPUT = b"persimmon_batch.input"
RENAME_ATOMIC = ("local", "hdfs")  # filesystems whose rename is atomic


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI pyarrow understands."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def discover(uri: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, base directory, shard paths relative to it), sorted; raises FileNotFoundError when the
    input names nothing or holds no Parquet files."""
    fs, path = resolve(uri)
    if any(ch in path for ch in "*?["):
        base = path
        while any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {uri} does not exist")
        if info.type == pafs.FileType.File:
            base, files = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        else:
            base = path
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    rel = sorted(str(PurePosixPath(f).relative_to(base)) if base else f for f in files)
    rel = [r for r in rel if not any(_hidden(part) for part in PurePosixPath(r).parts)]
    if not rel:
        raise FileNotFoundError(f"no Parquet files in input {uri}")
    return fs, base, rel


@dataclass
class WorkUnit:
    """One actor call: a shard, or a slice of its row groups (then part `part` of `parts`)."""

    shard: str  # path relative to the input base
    row_groups: list[int] | None = None
    part: int = 0
    parts: int = 1
    rows: int = 0

    @property
    def key(self) -> str:
        return self.shard if self.parts == 1 else f"{self.shard}#{self.part}"


def plan_units(fs: pafs.FileSystem, base: str, shard: str, rows_per_unit: int) -> list[WorkUnit]:
    """Whole shards, or for a shard with more than rows_per_unit rows, slices of its row groups.
    Only the Parquet footer is read; a shard whose footer cannot be read gets one unit (it fails there)."""
    try:
        with fs.open_input_file(join(base, shard)) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:
        return [WorkUnit(shard)]
    if meta.num_rows <= rows_per_unit or meta.num_row_groups < 2:
        return [WorkUnit(shard, rows=meta.num_rows)]
    slices, current, count = [], [], 0
    for g in range(meta.num_row_groups):
        current.append(g)
        count += meta.row_group(g).num_rows
        if count >= rows_per_unit:
            slices.append((current, count))
            current, count = [], 0
    if current:
        slices.append((current, count))
    return [WorkUnit(shard, groups, i, len(slices), n) for i, (groups, n) in enumerate(slices)]


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if base else rel


def output_name(shard: str) -> str:
    return shard if shard.endswith(".parquet") else shard + ".parquet"


def temporary_name(unit: WorkUnit) -> str:
    """An attempt-unique name under _temporary/: two attempts at one unit never write the same file."""
    flat = unit.key.replace("/", "__").replace("#", ".part")
    return f"{TEMPORARY}/{flat}.{uuid.uuid4().hex[:12]}.parquet"


def commit(fs: pafs.FileSystem, out_base: str, temp: str, final: str) -> None:
    """Move a finished temporary file to its final name atomically (a reader never sees a partial file)."""
    target = join(out_base, final)
    parent = target.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    fs.move(join(out_base, temp), target)


def clean_temporaries(fs: pafs.FileSystem, out_base: str) -> int:
    """Delete what crashed attempts left in _temporary/; returns how many files."""
    selector = pafs.FileSelector(join(out_base, TEMPORARY), recursive=True, allow_not_found=True)
    files = [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    for path in files:
        fs.delete_file(path)
    try:
        fs.delete_dir(join(out_base, TEMPORARY))
    except (FileNotFoundError, OSError):
        pass
    return len(files)


def committed_fingerprint(fs: pafs.FileSystem, out_base: str, final: str) -> str | None:
    """The fingerprint recorded in a committed output file's metadata, or None when there is none."""
    try:
        with fs.open_input_file(join(out_base, final)) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    except Exception:
        return None
    value = meta.get(META_FINGERPRINT)
    return value.decode() if value else None


class Manifest:
    """`_manifest.json`: per-shard state ("done" / "failed" / "pending"), counts, timings, node, and the
    job's spec and fingerprint. Written atomically after every change."""

    def __init__(self, fs: pafs.FileSystem, out_base: str, data: dict[str, Any]) -> None:
        self.fs, self.out_base, self.data = fs, out_base, data

    @classmethod
    def load(cls, fs: pafs.FileSystem, out_base: str) -> "Manifest | None":
        path = join(out_base, MANIFEST)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            try:
                return cls(fs, out_base, json.loads(f.read().decode()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); move it away to start over") from exc

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("shards", {})

    def counts(self) -> dict[str, int]:
        states = [s.get("state", "pending") for s in self.shards.values()]
        return {k: states.count(k) for k in ("done", "failed", "pending")}

    def save(self) -> None:
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps(self.data, indent=2, sort_keys=True, default=str)
        path = join(self.out_base, MANIFEST)
        self.fs.create_dir(self.out_base, recursive=True)
        if self.fs.type_name in RENAME_ATOMIC:
            temp = join(self.out_base, f"{TEMPORARY}/{MANIFEST}.{uuid.uuid4().hex[:8]}")
            self.fs.create_dir(join(self.out_base, TEMPORARY), recursive=True)
            with self.fs.open_output_stream(temp) as f:
                f.write(text.encode())
            self.fs.move(temp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(text.encode())

    def mark_success(self) -> None:
        with self.fs.open_output_stream(join(self.out_base, SUCCESS)) as f:
            f.write(b"")

    def clear_success(self) -> None:
        path = join(self.out_base, SUCCESS)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)


def check_text_column(fs: pafs.FileSystem, base: str, shards: list[str], column: str, sample: int = 8) -> None:
    """Refuse a job whose text column is in none of the first `sample` readable shards (a mistyped column
    name), before any work. A single shard without it, or unreadable, fails on its own later, in the manifest."""
    first: tuple[str, list[str]] | None = None
    checked = 0
    for shard in shards:
        try:
            with fs.open_input_file(join(base, shard)) as f:
                names = pq.ParquetFile(f).schema_arrow.names
        except Exception:
            continue
        if column in names:
            return
        first = first or (shard, names)
        checked += 1
        if checked == sample:
            break
    if first is not None:
        raise ValueError(f"text column {column!r} not in {first[0]}; its columns are {first[1]}")
