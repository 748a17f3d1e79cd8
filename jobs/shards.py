"""Input shards (discovery, identity, work units) and output files (temporaries, atomic commit).

Input is a Parquet file, a directory of them or a glob, on any filesystem pyarrow knows (local, s3://,
gs://, hdfs://). A path that exists is taken literally, glob characters and all; otherwise `*`, `?` and
`[...]` match within one path segment and `**` across segments. Hidden and `_`-prefixed files and folders are
skipped (and counted), and so are files without the .parquet suffix in a directory (a glob takes every file
it matches); the job's output tree never counts as input.

Each input shard gets one output file of the same relative name. An attempt writes to a unique name under
`_temporary/<run id>/` and is committed by moving it to its final name: an atomic rename on local and HDFS
filesystems; on object stores a server-side copy, whose object appears whole or not at all. Each committed
file carries in its Parquet metadata the job's fingerprint and the identity of the input it was computed
from (size, modification time, rows, row-group layout), so a rerun recognises what is done and what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

TEMPORARY = "_temporary"
META_FINGERPRINT = b"persimmon_batch.fingerprint"
META_INPUT = b"persimmon_batch.input"
META_IDENTITY = b"persimmon_batch.input_identity"
GLOB_CHARS = "*?["


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI pyarrow understands. Local paths are resolved through
    symlinks, so an output that is the input under another name is recognised as such."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), uri
    if fs.type_name == "local":
        path = os.path.realpath(path)
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute (symlinks resolved); a URI as it is."""
    return uri if "://" in uri else str(Path(uri).resolve())


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if base else rel


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (plain path comparison)."""
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _glob_regex(pattern: str) -> re.Pattern:
    """`*`, `?` and `[...]` match within one path segment, `**` across any number of segments."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        end = pattern.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end != -1:
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


@dataclass
class Discovery:
    fs: pafs.FileSystem
    base: str  # the folder shard names are relative to
    shards: list[str]
    skipped: int = 0  # files left out: hidden, _-prefixed, or not .parquet
    kind: str = "directory"  # "file", "directory" or "glob"
    files: dict[str, pafs.FileInfo] = field(default_factory=dict)  # shard -> its file info


def discover(uri: str, output: tuple[pafs.FileSystem, str] | None = None) -> Discovery:
    """The input's shards, sorted, relative to its base folder; files under `output` (the job's output
    folder, on its filesystem) are never input. Raises FileNotFoundError when the input names nothing or
    holds no Parquet files."""
    fs, path = resolve(uri)
    exclude = output[1] if output is not None and output[0].type_name == fs.type_name else None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        base = path.rsplit("/", 1)[0] if "/" in path else ""
        found = Discovery(fs, base, [], kind="file")
        candidates = [info]
    elif info.type == pafs.FileType.Directory:
        found = Discovery(fs, path, [], kind="directory")
        candidates = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    elif any(ch in path for ch in GLOB_CHARS):
        base = path
        while any(ch in base for ch in GLOB_CHARS):
            base = base.rsplit("/", 1)[0]
        regex = _glob_regex(path)
        found = Discovery(fs, base, [], kind="glob")
        listing = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        candidates = [i for i in listing if regex.match(i.path)]
    else:
        raise FileNotFoundError(f"input {uri} does not exist")
    if exclude is not None and inside(found.base, exclude):
        exclude = None  # the input lies inside the output folder: the output files are beside it, not in it
    for item in candidates:
        if item.type != pafs.FileType.File or (exclude is not None and inside(item.path, exclude)):
            continue
        rel = str(PurePosixPath(item.path).relative_to(found.base)) if found.base else item.path
        if any(_hidden(part) for part in PurePosixPath(rel).parts) or \
                (found.kind == "directory" and not rel.endswith(".parquet")):
            found.skipped += 1
            continue
        found.shards.append(rel)
        found.files[rel] = item
    found.shards.sort()
    if not found.shards:
        raise FileNotFoundError(f"no Parquet files in input {uri}")
    outputs: dict[str, str] = {}
    for rel in found.shards:
        other = outputs.setdefault(output_name(rel), rel)
        if other != rel:
            raise ValueError(f"input shards {other} and {rel} would both write output {output_name(rel)}; "
                             "rename one of them or narrow the input")
    return found


def output_overlap(discovery: Discovery, out_fs: pafs.FileSystem, out_base: str) -> str | None:
    """Why writing to out_base would overwrite the input (or feed outputs back into it), or None."""
    if out_fs.type_name != discovery.fs.type_name:
        return None
    if inside(out_base, discovery.base) and (discovery.kind == "directory" or out_base.rstrip("/") == discovery.base.rstrip("/")):
        return f"output {out_base} overlaps the input {discovery.base}: its files would replace or join the input"
    targets = {join(out_base, output_name(s)) for s in discovery.shards}
    clash = sorted(targets & {info.path for info in discovery.files.values()})
    if clash:
        return f"output {out_base} overlaps the input: {clash[0]} would be overwritten"
    return None


@dataclass
class ShardInfo:
    """What the driver learns of a shard from its footer, before any work: identity, layout, schema."""

    identity: dict[str, Any]
    row_groups: list[int]  # rows per row group
    columns: list[str]
    error: str | None = None  # not readable as Parquet


def inspect_shard(fs: pafs.FileSystem, base: str, shard: str, info: pafs.FileInfo | None = None) -> ShardInfo:
    """Read a shard's footer: its identity (size, modification time, rows, a digest of the row-group
    layout), row-group sizes and column names. A shard that is not Parquet gets `error`."""
    path = join(base, shard)
    info = info or fs.get_file_info(path)
    identity: dict[str, Any] = {"size": info.size, "mtime_ns": info.mtime_ns}
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            columns = meta.schema.to_arrow_schema().names
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for what is not Parquet
        return ShardInfo(identity, [], [], f"not a Parquet file ({type(exc).__name__}: {exc})")
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    layout = json.dumps([[meta.row_group(g).num_rows, meta.row_group(g).total_byte_size] for g in range(len(groups))])
    identity.update(rows=meta.num_rows, footer=hashlib.sha256(layout.encode()).hexdigest()[:16])
    return ShardInfo(identity, groups, columns)


@dataclass
class WorkUnit:
    """One actor call: a shard, or a slice of its row groups (then part `part` of `parts`)."""

    shard: str  # path relative to the input base
    row_groups: list[int] | None = None
    part: int = 0
    parts: int = 1
    rows: int = 0
    identity: dict[str, Any] = field(default_factory=dict)  # of the input, when the unit was planned

    @property
    def key(self) -> str:
        return self.shard if self.parts == 1 else f"{self.shard}#{self.part}"


def plan_units(shard: str, info: ShardInfo, rows_per_unit: int) -> list[WorkUnit]:
    """The whole shard, or for one over rows_per_unit rows with several row groups, slices of consecutive
    row groups of up to rows_per_unit rows each (a single larger row group is a slice of its own)."""
    rows = info.identity.get("rows", 0)
    if rows <= rows_per_unit or len(info.row_groups) < 2:
        return [WorkUnit(shard, rows=rows, identity=info.identity)]
    slices: list[tuple[list[int], int]] = []
    for g, n in enumerate(info.row_groups):
        if slices and slices[-1][1] + n <= rows_per_unit:
            slices[-1][0].append(g)
            slices[-1] = (slices[-1][0], slices[-1][1] + n)
        else:
            slices.append(([g], n))
    return [WorkUnit(shard, groups, i, len(slices), n, info.identity) for i, (groups, n) in enumerate(slices)]


def output_name(shard: str) -> str:
    return shard if shard.endswith(".parquet") else shard + ".parquet"


def temporary_name(unit: WorkUnit, run_id: str) -> str:
    """An attempt-unique name under this run's _temporary/ folder: no two attempts write the same file."""
    flat = unit.key.replace("/", "__").replace("#", ".part")
    return f"{TEMPORARY}/{run_id}/{flat}.{uuid.uuid4().hex[:12]}.parquet"


def commit(fs: pafs.FileSystem, out_base: str, temp: str, final: str) -> None:
    """Move a finished temporary file to its final name (a reader never sees a partial file)."""
    target = join(out_base, final)
    parent = target.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    fs.move(join(out_base, temp), target)


def remove_temporaries(fs: pafs.FileSystem, out_base: str, run_id: str | None = None) -> None:
    """Delete one run's temporaries (run_id), or every run's (None: only the lease holder may, when every
    other run is gone); the _temporary/ folder goes once empty."""
    top = join(out_base, TEMPORARY)
    target = join(top, run_id) if run_id else top
    try:
        fs.delete_dir(target)
    except (FileNotFoundError, OSError):
        pass
    if run_id:
        try:
            if not fs.get_file_info(pafs.FileSelector(top, allow_not_found=True)):
                fs.delete_dir(top)
        except (FileNotFoundError, OSError):
            pass


def committed_metadata(fs: pafs.FileSystem, out_base: str, final: str) -> tuple[dict[bytes, bytes], int]:
    """The schema metadata and row count of a committed output file (({}, 0) when unreadable)."""
    try:
        with fs.open_input_file(join(out_base, final)) as f:
            parquet = pq.ParquetFile(f)
            return parquet.schema_arrow.metadata or {}, parquet.metadata.num_rows
    except Exception:
        return {}, 0
