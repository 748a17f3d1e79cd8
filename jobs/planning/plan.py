"""Planning a run before Ray starts, and checking its end: what the output holds, what changed, what is left.

Planning lists the output once. A shard is skipped when the manifest records it done with the same input
identity and its output is there with the size recorded at commit (no file is read for that); otherwise its
footer is read. A shard whose output was committed by a run that died before recording it is adopted when
the output's metadata names this job's fingerprint and the input's current identity. A shard that changed
since its commit is reprocessed. A shard that cannot be processed at all (not Parquet, no text column, a
column the output would add) is failed here, without any attempt. A shard gone from the input is reported,
and with `overwrite` its output is listed for deletion: the planner decides, the runner deletes.

`missing_outputs` is the check before `_SUCCESS`: one listing of the output, and every shard the manifest
calls done must be there with its recorded size (on S3 one LIST call per 1,000 files; a footer is read only
when a size was never recorded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipelines.schema import clashing_columns, missing_text_column

from ..errors import ShardState, UsageError
from ..inputs.discovery import Discovery, ShardInfo, inspect_shard
from ..inputs.formats import REQUESTS, Format
from ..output.commit import META_FINGERPRINT, META_IDENTITY, committed_metadata, on_disk
from ..output.manifest import Manifest
from ..output.ownership import foreign_entries, refuse_foreign
from ..output.sinks import companions


@dataclass
class Plan:
    done: list[str] = field(default_factory=list)  # committed before this run
    adopted: list[str] = field(default_factory=list)  # committed by a run that died before recording them
    changed: list[str] = field(default_factory=list)  # committed, but their input changed since: redone
    redone: dict[str, str] = field(default_factory=dict)  # committed, but the output is gone or replaced: why
    removed: list[str] = field(default_factory=list)  # in the manifest, gone from the input
    delete: dict[str, str] = field(default_factory=dict)  # shard -> its output to delete (overwrite, input gone)
    rejected: dict[str, str] = field(default_factory=dict)  # shard -> why it cannot be processed at all
    pending: list[tuple[str, ShardInfo]] = field(default_factory=list)  # the shards to process, with their footers


def list_output(fs: pafs.FileSystem, out_base: str) -> list[pafs.FileInfo]:
    """Everything under the output folder, in one listing (none when it does not exist)."""
    return fs.get_file_info(pafs.FileSelector(out_base, recursive=True, allow_not_found=True))


def _files(listing: list[pafs.FileInfo], out_base: str) -> dict[str, pafs.FileInfo]:
    prefix = out_base.rstrip("/") + "/"
    return {i.path[len(prefix):]: i for i in listing if i.type == pafs.FileType.File}


def check_ownership(spec_output: str, fs: pafs.FileSystem, out_base: str, listing: list[pafs.FileInfo],
                    manifest: Manifest | None, discovery: Discovery) -> dict[str, tuple[dict, int]]:
    """Refuse (ForeignOutput) an output that holds anything not ours; returns the metadata and rows of the
    unrecorded files named like this job's outputs, which are ours by their metadata."""
    candidates = {name for s in discovery.shards for name in companions(discovery.output(s), discovery.format_of(s))}
    foreign, unrecorded = foreign_entries(listing, out_base, manifest, candidates)
    recognised = {}
    for name in unrecorded:
        meta, rows = committed_metadata(fs, out_base, name)
        if META_FINGERPRINT in meta:
            recognised[name] = (meta, rows)
        else:
            foreign.append(name)
    if foreign:
        raise refuse_foreign(spec_output, sorted(foreign))
    return recognised


def _column_problem(text_column: str, shard: str, info: ShardInfo, added: list[str]) -> str | None:
    if info.format == REQUESTS:
        return None  # request lines, not a table: each line's problems are that line's error
    return missing_text_column(text_column, info.columns, shard) or clashing_columns(added, info.columns)


def plan_run(spec, discovery: Discovery, manifest: Manifest, listing: list[pafs.FileInfo],
             recognised: dict[str, tuple[dict, int]], fingerprint: str, added: list[str]) -> Plan:
    """Decide each shard's fate and record it in the manifest (in memory). `added`: the output's columns;
    `listing`: the output folder's entries; `recognised`: unrecorded files of ours (check_ownership)."""
    plan = Plan()
    outputs = _files(listing, manifest.out_base)
    for shard in discovery.shards:
        file = discovery.files[shard]
        entry = manifest.shards.get(shard, {})
        final = discovery.output(shard)
        recorded = entry.get("input_identity") or {}
        present = outputs.get(final)
        was_done = entry.get("state") == ShardState.DONE.value
        output_problem = committed_problem(final, entry, present, outputs) if was_done else None
        if was_done and output_problem is None and \
                (recorded.get("size"), recorded.get("mtime_ns")) == (file.size, file.mtime_ns):
            plan.done.append(shard)
            continue
        info = inspect_shard(discovery.fs, discovery.base, shard, file, spec.text_column, discovery.format_of(shard),
                            spec.csv_delimiter)
        problem = info.error or _column_problem(spec.text_column, shard, info, added)
        if problem:
            plan.rejected[shard] = problem
            manifest.mark_failed(shard, final, problem, attempts=0)
            continue
        if entry.get("committing") and _committed_pair(entry, outputs, info.identity, fingerprint, manifest):
            manifest.shards[shard] = {**entry["committing"], "state": ShardState.DONE.value, "adopted": True}
            plan.adopted.append(shard)
            continue
        if present is not None and info.format == Format.PARQUET:
            meta, rows = recognised.get(final) or committed_metadata(manifest.fs, manifest.out_base, final)
            if meta.get(META_FINGERPRINT, b"").decode() == fingerprint and \
                    json.loads(meta.get(META_IDENTITY, b"null")) == info.identity:
                manifest.shards[shard] = {**entry, "state": ShardState.DONE.value, "output": final, "adopted": True,
                                          "input_identity": info.identity, "rows": rows, **on_disk(present)}
                plan.adopted.append(shard)
                continue
        note = None
        if output_problem is not None:
            plan.redone[shard] = output_problem
            note = output_problem
        elif was_done:
            plan.changed.append(shard)
            note = "input changed since its output was committed"
        manifest.mark_pending(shard, final, info.identity, note)
        plan.pending.append((shard, info))  # cut into units once the pool's size is known
    present_shards = set(discovery.shards)
    for shard, entry in list(manifest.shards.items()):
        output = entry.get("output", discovery.output(shard))
        if shard in present_shards:
            continue
        if output not in outputs:
            # nothing of it in the output but what an unfinished commit moved before it was cut off (an errors
            # file without its results): ours by the journal, removed with the record, never left unnamed
            moved = {name: recorded for name, recorded in _companions(entry).items() if name in outputs}
            if any(recorded.get("size") not in (None, outputs[name].size) for name, recorded in moved.items()):
                entry["state"] = ShardState.INPUT_REMOVED.value  # replaced since: kept, named, until --overwrite
                plan.removed.append(shard)
                continue
            for name in moved:
                plan.delete[f"{shard} ({name}, of a commit cut off)"] = name
            manifest.forget(shard)
        elif spec.overwrite:
            plan.delete[shard] = output
            for companion in _companions(entry):
                if companion in outputs:
                    plan.delete[f"{shard} ({companion})"] = companion
            manifest.forget(shard)
        else:  # committed once (whatever its last state), its input gone: the output stays until --overwrite
            entry["state"] = ShardState.INPUT_REMOVED.value
            plan.removed.append(shard)
    return plan


def _companions(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The files committed (or being committed) beside a shard's main output: name -> what was recorded."""
    return {**((entry.get("committing") or {}).get("companions") or {}), **(entry.get("companions") or {})}


def missing_outputs(fs: pafs.FileSystem, out_base: str, manifest: Manifest) -> dict[str, str]:
    """shard -> why its committed output is not what the manifest says (gone, another size), from one listing."""
    outputs = _files(list_output(fs, out_base), out_base)
    missing = {}
    for shard, entry in manifest.shards.items():
        if entry.get("state") != ShardState.DONE.value:
            continue
        name = entry.get("output", shard)
        found = outputs.get(name)
        if entry.get("size") is None and found is not None:  # committed before 0.4.0: its footer says
            if committed_metadata(fs, out_base, name)[1] != entry.get("rows"):
                missing[shard] = f"{name} no longer holds the {entry.get('rows')} rows committed"
        elif committed_problem(name, entry, found, outputs):
            missing[shard] = committed_problem(name, entry, found, outputs)
    return missing


def committed_problem(name: str, entry: dict[str, Any], found: pafs.FileInfo | None,
                      outputs: dict[str, pafs.FileInfo] | None = None) -> str | None:
    """How a committed file on disk (and the files committed with it, e.g. openai-batch's errors file)
    differs from what its commit recorded (None: it does not)."""
    checks = [(name, entry, found)] + [(other, recorded, (outputs or {}).get(other))
                                       for other, recorded in (entry.get("companions") or {}).items()]
    for file, recorded, present in checks:
        if present is None:
            return f"{file} was committed but is no longer in the output"
        if recorded.get("size") is not None and recorded["size"] != present.size:
            return f"{file} was committed with {recorded['size']} bytes but now has {present.size}"
        if recorded.get("output_mtime_ns") is not None and recorded["output_mtime_ns"] != present.mtime_ns:
            return f"{file} was replaced after it was committed (its modification time changed)"
    return None


def _committed_pair(entry: dict[str, Any], outputs: dict[str, pafs.FileInfo], identity: dict[str, Any],
                    fingerprint: str, manifest: Manifest) -> bool:
    """Whether a commit journaled as under way (files without metadata of their own: JSON Lines) finished:
    every file it was moving is there with the size it had, from this job and this input."""
    committing = entry["committing"]
    if manifest.data.get("fingerprint") not in (None, fingerprint) or entry.get("input_identity") != identity:
        return False
    sizes = {committing.get("output"): committing.get("size"),
             **{k: v.get("size") for k, v in (committing.get("companions") or {}).items()}}
    return all(name in outputs and outputs[name].size == size for name, size in sizes.items())


def check_text_column(spec, discovery: Discovery, sample: int = 8) -> None:
    """Refuse a job whose text column is in none of the first `sample` readable shards (a mistyped column
    name) before anything is written. A single shard without it fails on its own, in the manifest."""
    first: str | None = None
    checked = 0
    unreadable: list[str] = []
    for shard in discovery.shards:
        fmt = discovery.format_of(shard)
        info = inspect_shard(discovery.fs, discovery.base, shard, discovery.files[shard], spec.text_column, fmt,
                            spec.csv_delimiter)
        if info.error:
            unreadable.append(f"{shard}: {info.error}")
            if len(unreadable) == sample:
                break
            continue
        if fmt == REQUESTS:
            return
        problem = missing_text_column(spec.text_column, info.columns, shard)
        if problem is None:
            return
        first = first or problem
        checked += 1
        if checked == sample:
            break
    if first is not None:
        raise UsageError(first)
    if unreadable:  # not one readable shard among the first: the format or the path is wrong
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UsageError(f"input {unreadable[0]}{more}; nothing was written")


__all__ = ["Plan", "check_ownership", "check_text_column", "list_output", "missing_outputs", "plan_run"]
