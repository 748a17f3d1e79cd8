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

import bisect
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from ..errors import ShardState, UsageError
from .commit import META_FINGERPRINT, META_IDENTITY, committed_metadata, on_disk
from .discovery import Discovery, ShardInfo, inspect_shard, join
from .formats import REQUESTS, companions
from .manifest import Manifest
from .ownership import foreign_entries, refuse_foreign


@dataclass
class WorkUnit:
    """One actor call: a shard, or part `part` of `parts` of it: `rows` rows read from its row groups
    `row_groups`, after skipping the first `skip` rows of the first of them."""

    shard: str  # path relative to the input base
    row_groups: list[int] | None = None  # None: the whole shard
    part: int = 0
    parts: int = 1
    rows: int = 0
    identity: dict[str, Any] = field(default_factory=dict)  # of the input, when the unit was planned
    skip: int = 0
    work: int = 0  # bytes of text (uncompressed, from the footer): what the dispatcher's rates are per

    @property
    def key(self) -> str:
        """For people and file names (a shard's name may hold '#'); the dispatcher goes by `ident`."""
        return self.shard if self.parts == 1 else f"{self.shard}#{self.part}"

    @property
    def ident(self) -> tuple:
        return (self.shard, self.part, self.parts)


UNITS_PER_ACTOR = 3  # what the planner aims at for a pool: enough that the tail is short, few enough that
# per-unit costs (a Ray call, a temporary file, a commit, the merge that reads a split shard's parts back) stay
# far below the work
SNAP = 0.1  # a cut moves to a row-group boundary within this share of a unit's work (whole groups read once)


def plan_units(shard: str, info: ShardInfo, rows_per_unit: int, parts: int = 1, min_rows: int = 1) -> list[WorkUnit]:
    """The shard cut into about `parts` units of equal text (never under `min_rows` rows each), and into as many
    more as keep each unit at most `rows_per_unit` rows; one unit when that is one. Cuts fall at row-group
    boundaries where one is close, else inside a row group (the unit skips to its first row)."""
    rows = info.rows
    groups = info.row_groups
    text = info.group_bytes if len(info.group_bytes) == len(groups) else list(groups)
    capped, balanced = -(-rows // rows_per_unit), min(parts, rows // max(1, min_rows))
    want = max(capped, balanced)
    if want <= 1 or not groups:  # CSV / JSON Lines: no row groups, one unit of the file's size
        return [WorkUnit(shard, rows=rows, identity=info.identity, work=sum(text) or sum(info.group_bytes))]
    sizes = text if balanced >= capped else list(groups)  # the row cap is what splits it: equal rows
    total = sum(sizes)
    starts = list(itertools.accumulate(groups, initial=0))[:-1]  # the first row of each row group
    before = list(itertools.accumulate(sizes, initial=0))[:-1]  # the measure before each row group

    def row_at(work: float) -> int:  # the row where the cumulative measure reaches `work`
        g = bisect.bisect_right(before, work) - 1
        share = (work - before[g]) / sizes[g] if sizes[g] else 0.0
        return starts[g] + min(groups[g], round(share * groups[g]))

    cuts = [0]
    for k in range(1, want):
        goal = total * k / want
        i = bisect.bisect_left(before, goal)
        near = min((j for j in (i - 1, i) if 0 <= j < len(groups)), key=lambda j: abs(before[j] - goal))
        row = row_at(goal)
        if abs(before[near] - goal) <= SNAP * total / want and cuts[-1] < starts[near] < rows:
            row = starts[near]
        if cuts[-1] < row < rows:
            cuts.append(row)
    cuts.append(rows)
    spread = _spread(cuts, min_rows)
    ranges = []
    for a, b in zip(spread, spread[1:]):  # a part over the row cap (very uneven rows) is cut again, by rows:
        pieces = -(-(b - a) // rows_per_unit)  # the cap wins over min_rows
        ranges += [(a + (b - a) * i // pieces, a + (b - a) * (i + 1) // pieces) for i in range(pieces)]
    if len(ranges) == 1:
        return [WorkUnit(shard, rows=rows, identity=info.identity, work=sum(text))]
    text_before = list(itertools.accumulate(text, initial=0))[:-1]

    def work_before(row: int) -> float:  # the text before `row`
        g = bisect.bisect_right(starts, row) - 1
        return text_before[g] + (text[g] * (row - starts[g]) / groups[g] if groups[g] else 0)

    units = []
    for i, (a, b) in enumerate(ranges):
        first = bisect.bisect_right(starts, a) - 1
        last = bisect.bisect_left(starts, b) - 1
        units.append(WorkUnit(shard, list(range(first, last + 1)), i, len(ranges), b - a, info.identity,
                              skip=a - starts[first], work=round(work_before(b) - work_before(a))))
    return units


def _spread(cuts: list[int], min_rows: int) -> list[int]:
    """Cuts (0 first, the row count last) moved as little as needed for every part to hold min_rows rows,
    where the rows allow it: text-balanced cuts over rows of very uneven length can leave a few rows alone."""
    cuts = list(cuts)
    n = len(cuts) - 1
    if n * min_rows > cuts[-1]:
        return cuts  # only where the row cap made the parts: it wins over min_rows
    for k in range(1, n):
        cuts[k] = max(cuts[k], cuts[k - 1] + min_rows)
    for k in range(n - 1, 0, -1):
        cuts[k] = min(cuts[k], cuts[k + 1] - min_rows)
    return cuts


def size_for_pool(shards: list[tuple[str, ShardInfo]], actors: int, rows_per_unit: int,
                  min_rows: int) -> list[WorkUnit]:
    """The units of a run on `actors` actors, longest first (so the last to start are the short ones and the
    tail is short). With one actor each shard is one unit (split only over rows_per_unit rows). With more,
    the job is cut into about UNITS_PER_ACTOR units per actor of equal text: a shard with more than its share
    is split into as many units as its text is shares, a small one stays whole (a job of many similar shards
    is not split at all); no unit is under min_rows rows (the pipelines sort each record batch by length to
    pad little, so a unit under one record batch pads more and runs its batches part-full)."""
    works = {shard: sum(info.group_bytes) or info.rows for shard, info in shards}
    total = sum(works.values())
    share = total / (UNITS_PER_ACTOR * actors) if actors > 1 and total else 0.0
    units = [u for shard, info in shards for u in
             plan_units(shard, info, rows_per_unit, max(1, round(works[shard] / share)) if share else 1, min_rows)]
    units.sort(key=lambda u: -u.work)
    return units


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
    if text_column not in info.columns:
        return f"shard {shard} has no column {text_column!r}; its columns are {info.columns}"
    clash = [name for name in added if name in info.columns]
    if clash:
        return f"the input already has column(s) {clash} that the output adds; rename them first"
    return None


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
        if present is not None and info.format == "parquet":
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
    first: tuple[str, list[str]] | None = None
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
        if spec.text_column in info.columns:
            return
        first = first or (shard, info.columns)
        checked += 1
        if checked == sample:
            break
    if first is not None:
        raise UsageError(f"text column {spec.text_column!r} not in {first[0]}; its columns are {first[1]}")
    if unreadable:  # not one readable shard among the first: the format or the path is wrong
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UsageError(f"input {unreadable[0]}{more}; nothing was written")


__all__ = ["Plan", "WorkUnit", "check_ownership", "check_text_column", "join", "list_output", "missing_outputs",
           "plan_run", "plan_units", "size_for_pool"]
