"""Work units: a shard, or a slice of its rows, as one actor call; how a shard is cut for a pool of actors.
Pure (no Ray, no filesystem): the dispatcher takes these."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

from ..inputs.discovery import ShardInfo


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


def units_for_actors(shards: list[tuple[str, ShardInfo]], actors: int, rows_per_unit: int,
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
