"""`_manifest.json`: the job's record in its output directory, and `_journal/`, its per-commit increments.

The manifest holds the job (spec, model checksum, fingerprint, package version, start and end, the runs that
wrote here) and one entry per input shard (its ShardState, the input's identity, the committed file's size,
rows, errors, tokens, timings, node, attempts). It is written whole at the start of a run and at its end. In
between, each commit adds one small record under `_journal/`, so the cost of recording a commit does not grow
with the number of shards; the records are folded into the manifest when it is next written, or when it is
loaded after a crash. `_SUCCESS` appears once every input shard is committed and found on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import typing
import uuid
from typing import Any, TypedDict

import pyarrow.fs as pafs

from ..errors import ForeignOutput, ShardState
from .commit import write_whole
from .paths import join

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
JOURNAL = "_journal"
JOURNAL_NAME = re.compile(r"[0-9a-f]{20}\.json")
WRITE_LEFTOVER = re.compile(r"\._manifest\.json\.[0-9a-f]{8}")  # a manifest write cut short


class ShardEntry(TypedDict, total=False):
    """One input shard's record in `shards`: the one schema of an entry (a hand-edited manifest is checked
    against it before it is used; every field may be absent or null)."""

    state: str  # a ShardState value
    output: str  # the committed file, relative to the output folder
    input_identity: dict  # the input when it was committed: size, mtime_ns, and footer digest and rows
    size: int  # the committed file's bytes, and its mtime: how the end-of-run check knows it
    output_mtime_ns: int
    attempts: int
    error: str  # why the shard failed
    note: str  # why a committed shard is to be done again (its output was gone at the end of a run)
    companions: dict  # openai-batch: the errors file beside the results, name -> {size}
    committing: dict  # a commit under way: the entry it will have, journaled before its files move
    adopted: bool  # committed by a run that died before recording it, recognised by the next run
    # what processing it counted (execution/dispatcher.UNIT_COUNTS) and where it ran
    rows: int
    errors: int
    truncated: int
    nonfinite: int
    real_tokens: int
    padded_tokens: int
    generated_tokens: int
    seconds: float
    committed_at: float  # when the driver committed it (epoch seconds, the driver's clock)
    parts: int  # a shard cut into units: how many
    threads: int
    node: str
    host: str
    pid: int
    peak_rss_mb: float


ENTRY_FIELDS: dict[str, type] = {k: v for k, v in typing.get_type_hints(ShardEntry).items() if k != "state"}
JOB_FIELDS = {"fingerprint": str, "runs": list, "spec": dict, "model": dict, "lease": str, "drift": dict}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _not_ours(path: str, why: str) -> ForeignOutput:
    return ForeignOutput(f"{path} is not a persimmon-batch manifest ({why}); this folder holds another tool's "
                         "files: use another output folder")


def _of_type(value: Any, kind: type) -> bool:
    """JSON's types: a bool is no number, an int is a float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def check_shape(data: Any, path: str) -> dict[str, Any]:
    """The manifest as written by this tool, or ForeignOutput naming what is off."""
    if not isinstance(data, dict):
        raise _not_ours(path, f"a JSON {type(data).__name__}, not an object")
    shards = data.get("shards", {})
    if not isinstance(shards, dict):
        raise _not_ours(path, "its 'shards' is not an object")
    states = {s.value for s in ShardState}
    for name, entry in shards.items():
        if not isinstance(entry, dict) or entry.get("state", ShardState.PENDING.value) not in states:
            raise _not_ours(path, f"shard entry {name!r} is {entry!r}")
        for key, kind in ENTRY_FIELDS.items():
            value = entry.get(key)
            if value is not None and not _of_type(value, kind):
                raise _not_ours(path, f"shard entry {name!r} has {key} {value!r}")
    for key, kind in JOB_FIELDS.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise _not_ours(path, f"its {key} is {data[key]!r}")
    if not all(isinstance(run, str) for run in data.get("runs") or []):
        raise _not_ours(path, f"its runs are {data['runs']!r}")
    return data


class Manifest:
    def __init__(self, fs: pafs.FileSystem, out_base: str, data: dict[str, Any]) -> None:
        self.fs, self.out_base, self.data = fs, out_base, data

    @classmethod
    def load(cls, fs: pafs.FileSystem, out_base: str) -> "Manifest | None":
        """The manifest with any journal records of a run that ended before folding them in; None if the
        directory holds neither. ForeignOutput when it is not ours."""
        path = join(out_base, MANIFEST)
        manifest = None
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            raise _not_ours(path, "a folder")
        if info.type != pafs.FileType.NotFound:
            with fs.open_input_stream(path) as f:
                text = f.read()
            try:
                data = json.loads(text.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ForeignOutput(f"{path} is not valid JSON ({exc}); move it away to start over") from None
            manifest = cls(fs, out_base, check_shape(data, path))
        records = fs.get_file_info(pafs.FileSelector(join(out_base, JOURNAL), allow_not_found=True))
        for info in sorted(records, key=lambda i: i.path):
            if not JOURNAL_NAME.fullmatch(info.base_name):
                continue  # not ours: the ownership check names it
            try:
                with fs.open_input_stream(info.path) as f:
                    record = json.loads(f.read().decode())
                shard, entry = record["shard"], record["entry"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record cut short by a crash: its commit is recognised from the file's metadata
            manifest = manifest or cls(fs, out_base, {"shards": {}})
            if record.get("fingerprint") == manifest.data.get("fingerprint") or "fingerprint" not in manifest.data:
                manifest.shards[shard] = entry
        return manifest

    @property
    def shards(self) -> dict[str, ShardEntry]:
        return self.data.setdefault("shards", {})

    def runs(self) -> set[str]:
        """The run ids that wrote here (their temporaries under _temporary/<run id>/ are ours)."""
        runs = set(self.data.get("runs", []) or [])
        found = re.search(r"run ([0-9a-f]{12})", str(self.data.get("lease", "")))
        return runs | ({found.group(1)} if found else set())

    def add_run(self, run_id: str) -> None:
        self.data["runs"] = [*self.data.get("runs", [])[-49:], run_id]

    def counts(self) -> dict[str, int]:
        states = [s.get("state", ShardState.PENDING.value) for s in self.shards.values()]
        return {state.value: states.count(state.value) for state in ShardState}

    def mark_pending(self, shard: str, output: str, identity: dict[str, Any], note: str | None = None) -> None:
        self.shards[shard] = {"state": ShardState.PENDING.value, "output": output, "input_identity": identity,
                              **({"note": note} if note else {})}

    def mark_failed(self, shard: str, output: str, reason: str, attempts: int) -> None:
        """Recorded when the manifest is next written: a rerun retries a failed shard anyway."""
        self.shards[shard] = {**self.shards.get(shard, {}), "state": ShardState.FAILED.value, "output": output,
                              "error": reason, "attempts": attempts}

    def mark_done(self, shard: str, entry: dict[str, Any]) -> None:
        """Record a commit at once, as one small journal record (constant cost whatever the shard count)."""
        entry = {**entry, "state": ShardState.DONE.value}
        entry.pop("committing", None)
        self.shards[shard] = entry
        name = hashlib.sha1(shard.encode()).hexdigest()[:20]
        record = {"shard": shard, "fingerprint": self.data.get("fingerprint"), "entry": entry}
        self._write(join(self.out_base, f"{JOURNAL}/{name}.json"), json.dumps(record, default=str).encode())

    def mark_committing(self, shard: str, entry: dict[str, Any]) -> None:
        """Journal a commit of files that carry no metadata of their own (JSON Lines) before they are moved
        into place: a run that dies between the move and mark_done leaves a record its successor adopts the
        files by (when they are all there with these sizes) instead of taking them for someone else's."""
        self.shards[shard] = {**self.shards.get(shard, {}), "committing": entry}
        name = hashlib.sha1(shard.encode()).hexdigest()[:20]
        record = {"shard": shard, "fingerprint": self.data.get("fingerprint"), "entry": self.shards[shard]}
        self._write(join(self.out_base, f"{JOURNAL}/{name}.json"), json.dumps(record, default=str).encode())

    def forget(self, shard: str) -> None:
        self.shards.pop(shard, None)

    def save(self) -> None:
        """Write the whole manifest atomically, then drop the journal records it now holds."""
        self.data["updated_at"] = _now()
        text = json.dumps(self.data, indent=2, sort_keys=True, default=str)
        self.fs.create_dir(self.out_base, recursive=True)
        self._write(join(self.out_base, MANIFEST), text.encode())
        try:
            self.fs.delete_dir(join(self.out_base, JOURNAL))
        except OSError:
            pass

    def _write(self, path: str, data: bytes) -> None:
        parent, name = path.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        write_whole(self.fs, path, data, join(parent, f".{name}.{uuid.uuid4().hex[:8]}"))

    def mark_success(self) -> None:
        with self.fs.open_output_stream(join(self.out_base, SUCCESS)) as f:
            f.write(b"")

    def clear_success(self) -> None:
        path = join(self.out_base, SUCCESS)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)
