"""Planning a run before Ray starts: what the output already holds, what changed, what is left to do.

A shard is skipped when the manifest records it done with the same input identity and its output exists
(no file is read for that); otherwise its footer is read. A shard whose output was committed by a run that
died before recording it is adopted when the output's metadata names this job's fingerprint and the
input's current identity. A shard that changed since its commit is reprocessed. A shard that cannot be
processed at all (not Parquet, no text column, a column the output would add) is failed here, without
any attempt. A shard gone from the input is reported, and with `overwrite` its output is removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .manifest import Manifest
from .shards import (
    META_FINGERPRINT,
    META_IDENTITY,
    Discovery,
    ShardInfo,
    WorkUnit,
    committed_metadata,
    inspect_shard,
    join,
    output_name,
    plan_units,
)
from .spec import JobSpec

INPUT_REMOVED = "input_removed"  # manifest state of a shard whose input is gone (its output kept)


@dataclass
class Plan:
    units: list[WorkUnit] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # committed before this run
    adopted: list[str] = field(default_factory=list)  # committed by a run that died before recording them
    changed: list[str] = field(default_factory=list)  # committed, but their input changed since: redone
    removed: list[str] = field(default_factory=list)  # in the manifest, gone from the input
    deleted: list[str] = field(default_factory=list)  # outputs of removed shards deleted (overwrite)
    rejected: dict[str, str] = field(default_factory=dict)  # shard -> why it cannot be processed at all


def _outputs(fs: pafs.FileSystem, out_base: str) -> dict[str, pafs.FileInfo]:
    """Committed-looking files under the output, by path relative to it (one listing)."""
    infos = fs.get_file_info(pafs.FileSelector(out_base, recursive=True, allow_not_found=True))
    prefix = out_base.rstrip("/") + "/"
    found = {}
    for info in infos:
        rel = info.path[len(prefix):]
        if info.type == pafs.FileType.File and not rel.startswith(("_", ".")):
            found[rel] = info
    return found


def _column_problem(spec: JobSpec, shard: str, info: ShardInfo, added: list[str]) -> str | None:
    if spec.text_column not in info.columns:
        return f"shard {shard} has no column {spec.text_column!r}; its columns are {info.columns}"
    clash = [name for name in added if name in info.columns]
    if clash:
        return f"the input already has column(s) {clash} that the output adds; rename them first"
    return None


def plan_run(spec: JobSpec, discovery: Discovery, manifest: Manifest, out_fs: pafs.FileSystem, out_base: str,
             fingerprint: str, added: list[str]) -> Plan:
    """Decide each shard's fate and record it in the manifest (in memory). `added`: the output's columns."""
    plan = Plan()
    outputs = _outputs(out_fs, out_base)
    for shard in discovery.shards:
        file = discovery.files[shard]
        entry = manifest.shards.get(shard, {})
        final = output_name(shard)
        recorded = entry.get("input_identity") or {}
        if entry.get("state") == "done" and final in outputs and \
                (recorded.get("size"), recorded.get("mtime_ns")) == (file.size, file.mtime_ns):
            plan.done.append(shard)
            continue
        info = inspect_shard(discovery.fs, discovery.base, shard, file)
        problem = info.error or _column_problem(spec, shard, info, added)
        if problem:
            plan.rejected[shard] = problem
            manifest.mark_failed(shard, final, problem, attempts=0)
            continue
        if final in outputs:
            meta, rows = committed_metadata(out_fs, out_base, final)
            if META_FINGERPRINT not in meta and not entry and not spec.overwrite:
                # neither in the manifest nor marked as ours: a file of the user's that happens to sit there
                raise ValueError(f"output {spec.output} already holds {final}, which persimmon-batch did not "
                                 "write; use an empty output folder (or --overwrite to replace it)")
            if meta.get(META_FINGERPRINT, b"").decode() == fingerprint and \
                    json.loads(meta.get(META_IDENTITY, b"null")) == info.identity:
                manifest.shards[shard] = {**entry, "state": "done", "output": final, "adopted": True,
                                          "input_identity": info.identity, "rows": rows}
                plan.adopted.append(shard)
                continue
        note = None
        if entry.get("state") == "done":
            plan.changed.append(shard)
            note = "input changed since its output was committed"
        manifest.mark_pending(shard, final, info.identity, note)
        plan.units += plan_units(shard, info, spec.runner.rows_per_unit)
    present = set(discovery.shards)
    for shard, entry in list(manifest.shards.items()):
        output = entry.get("output", output_name(shard))
        if shard in present:
            continue
        if output not in outputs:
            manifest.forget(shard)  # nothing of it in the output: nothing to keep or report
        elif spec.overwrite:
            out_fs.delete_file(join(out_base, output))
            plan.deleted.append(shard)
            manifest.forget(shard)
        else:  # committed once (whatever its last state), its input gone: the output stays until --overwrite
            entry["state"] = INPUT_REMOVED
            plan.removed.append(shard)
    return plan


def check_text_column(spec: JobSpec, discovery: Discovery, sample: int = 8) -> None:
    """Refuse a job whose text column is in none of the first `sample` readable shards (a mistyped column
    name) before anything is written. A single shard without it fails on its own, in the manifest."""
    first: tuple[str, list[str]] | None = None
    checked = 0
    for shard in discovery.shards:
        info = inspect_shard(discovery.fs, discovery.base, shard, discovery.files[shard])
        if info.error:
            continue
        if spec.text_column in info.columns:
            return
        first = first or (shard, info.columns)
        checked += 1
        if checked == sample:
            break
    if first is not None:
        raise ValueError(f"text column {spec.text_column!r} not in {first[0]}; its columns are {first[1]}")
