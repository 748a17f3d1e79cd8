"""Input shards: where they are (discovery), what they are (identity, footer), and whether an output overlaps them.

Input is a Parquet file, a directory of them or a glob, on any filesystem pyarrow knows (local, s3://,
gs://, hdfs://). A path that exists is taken literally, glob characters and all; otherwise `*`, `?` and
`[...]` match within one path segment and `**` across segments. Hidden and `_`-prefixed files and folders are
skipped (and counted), and so are files without the .parquet suffix in a directory (a glob takes every file
it matches); the job's output tree never counts as input.

On a local filesystem the walk is by identity, not by path: every folder is entered once (by device and
inode), so a link back up the tree (`sub/up -> ..`) or two links to one folder add nothing; each real file is
listed once, under its first name; links into /proc, /sys and /dev are not followed; a folder that cannot be
read stops the job (its rows would be lost silently otherwise). Whether an output lies inside the input is
decided the same way: by the device and inode of the output's existing folders against the input's folders,
which also sees through bind mounts (`-v /lake:/in -v /lake/out:/out`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from persimmon.kinds import Kind

from ..errors import UsageError
from .formats import Format
from ..output.paths import existing_chain, folder_key, inside, join, resolve

GLOB_CHARS = "*?["
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


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


class InputKind(Kind):
    """What an input path named: one file, a folder of files, or a glob pattern."""

    FILE = "file"
    DIRECTORY = "directory"
    GLOB = "glob"


@dataclass
class Discovery:
    fs: pafs.FileSystem
    base: str  # the folder shard names are relative to
    shards: list[str]
    skipped: int = 0  # entries left out: hidden, _-prefixed, or not .parquet
    skipped_names: list[str] = field(default_factory=list)  # the first SKIPPED_SHOWN of them, to name them
    kind: InputKind = InputKind.DIRECTORY
    files: dict[str, pafs.FileInfo] = field(default_factory=dict)  # shard -> its file info
    # local only: (device, inode) of the folders that are input (every folder of a directory input; the folders
    # holding the files of a file or glob input)
    folders: dict[tuple[int, int], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # links not followed, files listed under another name
    format: str | None = None  # the job's input format (None: each file's by its suffix)

    def format_of(self, shard: str) -> str:
        from .formats import shard_format

        return shard_format(shard, self.format)

    def output(self, shard: str) -> str:
        """The output file a shard's results are committed to, relative to the output folder."""
        from ..output.sinks import output_name

        return output_name(shard, self.format_of(shard))


@dataclass
class _Walk:
    """A local tree walked by identity: (logical path, stat) of each real file once."""

    files: list[tuple[str, os.stat_result]] = field(default_factory=list)
    folders: dict[tuple[int, int], str] = field(default_factory=dict)
    skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


SKIPPED_SHOWN = 5  # skipped entries named in the run's note (the rest counted)


def _skip(found, name: str) -> None:
    found.skipped += 1
    if len(found.skipped_names) < SKIPPED_SHOWN:
        found.skipped_names.append(name)


def _unreadable(path: str, exc: OSError) -> UsageError:
    return UsageError(f"cannot read input folder {path}: {exc.strerror or exc}; fix its permissions or leave "
                      "it out of the input (its rows would be missing otherwise)")


def _walk_local(base: str, exclude: tuple[int, int] | None, skip_hidden: bool) -> _Walk:
    walk = _Walk()
    seen_files: dict[tuple[int, int], int] = {}  # file identity -> its index in walk.files
    root = folder_key(base)
    if root is None:  # a glob whose fixed part names nothing
        return walk
    walk.folders[root] = base
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise _unreadable(folder, exc) from None
        for entry in entries:
            if skip_hidden and _hidden(entry.name):
                _skip(walk, os.path.relpath(entry.path, base))
                continue
            try:
                st = os.stat(entry.path)  # through links
            except FileNotFoundError:
                walk.notes.append(f"input: {entry.path} is a broken link: skipped")
                continue
            except OSError as exc:
                raise _unreadable(entry.path, exc) from None
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key == exclude:  # the output: never input, but still a folder of the input's tree
                    walk.folders[key] = entry.path
                    continue
                if key in walk.folders:
                    walk.notes.append(f"input: {entry.path} is the folder {walk.folders[key]} again (a link): "
                                      "not listed twice")
                    continue
                real = os.path.realpath(entry.path)
                if any(inside(real, pseudo) for pseudo in PSEUDO_FILESYSTEMS):
                    walk.notes.append(f"input: {entry.path} links into {real}: not followed")
                    continue
                walk.folders[key] = entry.path
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen_files:  # the same file under a second name: listed once, under its own name
                    first, _ = walk.files[seen_files[key]]
                    if os.path.islink(first) and not entry.is_symlink():
                        walk.files[seen_files[key]] = (entry.path, st)
                        first, second = entry.path, first
                    else:
                        second = entry.path
                    walk.notes.append(f"input: {second} is the file {first} again: listed once")
                    continue
                seen_files[key] = len(walk.files)
                walk.files.append((entry.path, st))
            else:
                _skip(walk, os.path.relpath(entry.path, base))  # a FIFO, socket or device: not data
    return walk


def _info(path: str, st: os.stat_result) -> pafs.FileInfo:
    return pafs.FileInfo(path, pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _not_regular(uri: str) -> UsageError:
    return UsageError(f"input {uri} is not a regular file (a pipe, device or socket); give a Parquet file, a "
                      "folder or a glob")


def discover(uri: str, output: tuple[pafs.FileSystem, str] | None = None, input_format: str | None = None) -> Discovery:
    """The input's shards, sorted, relative to its base folder; files under `output` (the job's output
    folder, on its filesystem) are never input. A folder's files are taken by suffix (formats.takes), or all
    of them when `input_format` names the format. Raises UsageError when the input names nothing, holds no
    input files, or cannot be read."""
    from .formats import NAMES, takes

    if not str(uri).strip():
        raise UsageError("the input is empty: give a Parquet file, a folder or a glob")
    fs, path = resolve(uri)
    local = fs.type_name == "local"
    same_fs = output is not None and output[0].type_name == fs.type_name
    if local:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _unreadable(path, exc) from None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _not_regular(uri)
        kind = None if st is None else (InputKind.FILE if stat.S_ISREG(st.st_mode) else InputKind.DIRECTORY)
    else:
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise UsageError(f"cannot read input {uri}: {exc}") from None
        kind = {pafs.FileType.File: InputKind.FILE, pafs.FileType.Directory: InputKind.DIRECTORY}.get(info.type)
    if kind is None and not any(ch in path for ch in GLOB_CHARS):
        raise UsageError(f"input {uri} does not exist")
    kind = kind or InputKind.GLOB
    if kind == InputKind.FILE:
        base = path.rsplit("/", 1)[0] if "/" in path else ""
    elif kind == InputKind.DIRECTORY:
        base = path
    else:
        base = path
        while any(ch in base for ch in GLOB_CHARS):
            base = base.rsplit("/", 1)[0]
    found = Discovery(fs, base, [], kind=kind, format=input_format)
    exclude_path = output[1] if same_fs else None
    if exclude_path is not None and inside(found.base, exclude_path):
        exclude_path = None  # the input lies inside the output folder: the output files are beside it, not in it
    if local:
        candidates = _local_candidates(found, path, exclude_path)
    else:
        candidates = _remote_candidates(found, path, exclude_path)
    for item in candidates:
        rel = str(PurePosixPath(item.path).relative_to(found.base)) if found.base else item.path
        if any(_hidden(part) for part in PurePosixPath(rel).parts) or \
                (found.kind == InputKind.DIRECTORY and not takes(rel, input_format)):
            _skip(found, rel)
            continue
        found.shards.append(rel)
        found.files[rel] = item
    found.shards.sort()
    if not found.shards:
        kinds = NAMES.get(input_format) or "Parquet, CSV or JSON Lines"
        raise UsageError(f"no {kinds} files in input {uri}")
    from ..output.sinks import companions
    from .formats import ERRORS_SUFFIX

    outputs: dict[str, str] = {}  # every file an input's output is made of (openai-batch: its errors file too)
    for rel in found.shards:
        for name in companions(found.output(rel), found.format_of(rel)):
            other = outputs.setdefault(name, rel)
            if other != rel:
                own = (" (the errors file this tool writes for the other: to retry its failed lines, copy them to a "
                       "file of another name)") if name.endswith(ERRORS_SUFFIX) else ""
                raise UsageError(f"input shards {other} and {rel} would both write output {name}{own}; rename one "
                                 "of them or narrow the input")
    return found


def _local_candidates(found: Discovery, path: str, exclude_path: str | None) -> list[pafs.FileInfo]:
    exclude = folder_key(exclude_path) if exclude_path else None
    if found.kind == InputKind.FILE:
        st = os.stat(path)
        key = folder_key(found.base or ".")
        if key is not None:
            found.folders[key] = found.base
        return [_info(path, st)]
    walk = _walk_local(found.base, exclude, skip_hidden=True)
    found.skipped += walk.skipped
    found.skipped_names = (found.skipped_names + walk.skipped_names)[:SKIPPED_SHOWN]
    found.notes += walk.notes
    items = [_info(p, st) for p, st in walk.files]
    if found.kind == InputKind.DIRECTORY:
        found.folders.update(walk.folders)
        return items
    regex = _glob_regex(path)
    matched = [i for i in items if regex.match(i.path)]
    for item in matched:  # a glob's input folders: those holding its files (and its base)
        folder = item.path.rsplit("/", 1)[0]
        key = folder_key(folder)
        if key is not None:
            found.folders[key] = folder
    return matched


def _remote_candidates(found: Discovery, path: str, exclude_path: str | None) -> list[pafs.FileInfo]:
    if found.kind == InputKind.FILE:
        return [found.fs.get_file_info(path)]
    try:
        listing = found.fs.get_file_info(pafs.FileSelector(found.base, recursive=True,
                                                           allow_not_found=found.kind == InputKind.GLOB))
    except OSError as exc:
        raise UsageError(f"cannot list input {found.base}: {exc}") from None
    items = [i for i in listing if i.type == pafs.FileType.File
             and not (exclude_path is not None and inside(i.path, exclude_path))]
    if found.kind == InputKind.GLOB:
        regex = _glob_regex(path)
        items = [i for i in items if regex.match(i.path)]
    return items


def output_overlap(discovery: Discovery, out_fs: pafs.FileSystem, out_base: str) -> str | None:
    """Why writing to out_base would overwrite the input (or feed outputs back into it), or None. Locally
    decided by folder identity (device, inode), so a link or a bind mount does not hide the overlap."""
    from ..output.sinks import companions

    if out_fs.type_name != discovery.fs.type_name:
        return None
    if out_fs.type_name == "local":
        chain = existing_chain(out_base)
        itself = os.path.abspath(out_base)
        if discovery.kind == InputKind.DIRECTORY:
            for folder, key in chain:
                if key in discovery.folders:
                    seen = discovery.folders[key]  # the input's folder, as discovery reached it
                    if folder == seen and folder == itself:
                        where = "it is the input folder"
                    elif folder == seen:
                        where = f"it is inside the input folder {seen}"
                    elif folder == itself:
                        where = f"it is inside the input (the same folder as {seen}, by another path)"
                    else:
                        where = f"it is inside the input: {folder} is the input's folder {seen} by another path"
                    return f"output {out_base} overlaps the input: {where}: its files would join the input"
        elif chain and chain[0][0] == itself and chain[0][1] in discovery.folders:
            return (f"output {out_base} overlaps the input: it is the folder the input's files are in, where its "
                    "files would replace or join them")
    elif inside(out_base, discovery.base) and (discovery.kind == InputKind.DIRECTORY
                                               or out_base.rstrip("/") == discovery.base.rstrip("/")):
        where = "it is the input folder" if out_base.rstrip("/") == discovery.base.rstrip("/") else \
            f"it is inside the input folder {discovery.base}"
        return f"output {out_base} overlaps the input: {where}: its files would replace or join the input"
    targets = {join(out_base, name) for s in discovery.shards
               for name in companions(discovery.output(s), discovery.format_of(s))}
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
    error: str | None = None  # not readable as its format
    group_bytes: list[int] = field(default_factory=list)  # the text column's uncompressed bytes per row group
    format: Format = Format.PARQUET
    estimated_rows: int = 0  # CSV / JSON Lines / request files: from the first block (no footer says)

    @property
    def rows(self) -> int:
        return self.identity.get("rows", self.estimated_rows)


def inspect_shard(fs: pafs.FileSystem, base: str, shard: str, info: pafs.FileInfo | None = None,
                  text_column: str | None = None, fmt: Format = Format.PARQUET,
                  delimiter: str | None = None) -> ShardInfo:
    """Read a shard's footer: its identity (size, modification time, rows, a digest of the row-group
    layout), row-group sizes, the text column's bytes per row group (the planner's measure of work; all
    columns' where there is no such column) and column names. A shard that is not of its format gets
    `error`. CSV, JSON Lines and request files have no footer: their identity is size and modification time,
    their columns and an estimate of their rows come from the first block, their work is their size."""
    path = join(base, shard)
    info = info or fs.get_file_info(path)
    identity: dict[str, Any] = {"size": info.size, "mtime_ns": info.mtime_ns}
    if fmt != Format.PARQUET:
        from pipelines.errors import one_line

        from .formats import NAMES, HeaderProblem, compression_problem, inspect_text_file

        try:
            columns, rows = inspect_text_file(fs, path, fmt, text_column, delimiter or ",")
        except HeaderProblem as exc:
            return ShardInfo(identity, [], [], str(exc), format=fmt)
        except Exception as exc:  # ArrowInvalid for what does not parse, OSError for what cannot be read
            problem = compression_problem(exc, shard) or (f"not a {NAMES[fmt]} file ({type(exc).__name__}: "
                                                          f"{one_line(exc, 300)})")
            return ShardInfo(identity, [], [], problem, format=fmt)
        return ShardInfo(identity, [], columns, group_bytes=[info.size or 0], format=fmt, estimated_rows=rows)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            columns = meta.schema.to_arrow_schema().names
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for what is not Parquet
        return ShardInfo(identity, [], [], f"not a Parquet file ({type(exc).__name__}: {exc})")
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    layout = json.dumps([[meta.row_group(g).num_rows, meta.row_group(g).total_byte_size] for g in range(len(groups))])
    identity.update(rows=meta.num_rows, footer=hashlib.sha256(layout.encode()).hexdigest()[:16])
    return ShardInfo(identity, groups, columns, group_bytes=_text_bytes(meta, text_column))


def _text_bytes(meta: pq.FileMetaData, text_column: str | None) -> list[int]:
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    index = paths.index(text_column) if text_column in paths else None
    sizes = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if index is None:
            sizes.append(group.total_byte_size)
        else:  # less the 4-byte length of each value, which says nothing of the text's length
            sizes.append(max(group.column(index).total_uncompressed_size - 4 * group.num_rows, group.num_rows))
    return sizes
