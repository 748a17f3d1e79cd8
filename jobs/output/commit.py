"""Output files: attempt-unique temporaries, the atomic commit, and what a committed file carries.

Each input shard gets one output file of the same relative name. An attempt writes to a unique name under
`_temporary/<run id>/` and is committed by moving it to its final name: an atomic rename on local and HDFS
filesystems; on object stores a server-side copy, whose object appears whole or not at all. Each committed
file carries in its Parquet metadata the job's fingerprint and the identity of the input it was computed
from (size, modification time, rows, row-group layout), so a rerun recognises what is done and what changed.
"""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .paths import join

TEMPORARY = "_temporary"
META_FINGERPRINT = b"persimmon_batch.fingerprint"
META_INPUT = b"persimmon_batch.input"
META_IDENTITY = b"persimmon_batch.input_identity"


def temporary_name(key: str, run_id: str, suffix: str = ".parquet") -> str:
    """An attempt-unique name under this run's _temporary/ folder: no two attempts write the same file."""
    flat = key.replace("/", "__").replace("#", ".part")
    return f"{TEMPORARY}/{run_id}/{flat}.{uuid.uuid4().hex[:12]}{suffix}"


def commit(fs: pafs.FileSystem, out_base: str, temp: str, final: str) -> dict[str, int]:
    """Move a finished temporary file to its final name (a reader never sees a partial file); returns the
    committed file's size and modification time, which the end-of-run check compares with what is on disk."""
    target = join(out_base, final)
    parent = target.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if fs.get_file_info(target).type == pafs.FileType.Directory:
        raise IsADirectoryError(f"{target} is a folder, not a committed file")
    fs.move(join(out_base, temp), target)
    info = fs.get_file_info(target)
    return on_disk(info)


def remove_file(fs: pafs.FileSystem, out_base: str, name: str) -> None:
    """Delete an output file where there is one."""
    target = join(out_base, name)
    if fs.get_file_info(target).type == pafs.FileType.File:
        fs.delete_file(target)


def on_disk(info: pafs.FileInfo) -> dict[str, int]:
    """What the end-of-run check compares of a committed file: its size and modification time."""
    return {"size": info.size, "output_mtime_ns": info.mtime_ns}


RENAME_ATOMIC = ("local", "hdfs")  # filesystems whose rename is atomic


def write_whole(fs: pafs.FileSystem, path: str, data: bytes, temp: str) -> None:
    """Readers see the old file or the new one: `temp` renamed into place where rename is atomic (a write that
    fails leaves no temporary behind); elsewhere a single object write (atomic on object stores)."""
    if fs.type_name not in RENAME_ATOMIC:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    try:
        with fs.open_output_stream(temp) as f:
            f.write(data)
        fs.move(temp, path)
    except BaseException:
        try:
            fs.delete_file(temp)
        except OSError:
            pass
        raise


def remove_temporaries(fs: pafs.FileSystem, out_base: str, run_id: str | None = None) -> None:
    """Delete one run's temporaries (run_id), or every run's (None: only the lease holder may, when every
    other run is gone); the _temporary/ folder goes once empty."""
    top = join(out_base, TEMPORARY)
    target = join(top, run_id) if run_id else top
    try:
        fs.delete_dir(target)
    except OSError:
        pass
    if run_id:
        try:
            if not fs.get_file_info(pafs.FileSelector(top, allow_not_found=True)):
                fs.delete_dir(top)
        except OSError:
            pass


def committed_metadata(fs: pafs.FileSystem, out_base: str, final: str) -> tuple[dict[bytes, bytes], int]:
    """The schema metadata and row count of a committed output file (({}, 0) when unreadable)."""
    try:
        with fs.open_input_file(join(out_base, final)) as f:
            parquet = pq.ParquetFile(f)
            return parquet.schema_arrow.metadata or {}, parquet.metadata.num_rows
    except Exception:
        return {}, 0
