"""The runner's policy, as code without Ray or a filesystem: which unit an idle actor gets, what a result
means, when an actor is stalled, when placement has failed, when the job stops.

The pool (pool.py) turns actors and Ray's futures into calls of this class; the runner executes what it
decides (commits, failures). A clock is injected, so every rule is tested in milliseconds
(tests/jobs/test_dispatcher.py).

Actors move through: requested -> loading (placed, loading the model) -> idle <-> busy -> gone.
- An idle actor gets the next unit of the queue (a merge of a sliced shard's parts first).
- A unit whose attempt failed is queued again until it has failed `max_attempts` times; one that cannot
  succeed (a bad shard: `permanent`) fails at once; one whose failure means the job cannot go on (the model
  changed on disk: `fatal`) stops the job.
- Slices of a shard are merged, in order, once every part is in; the merge is a unit of its own.
- Liveness, on the driver's clock: an actor that has not answered for the stall timeout, or that reports
  being inside one model batch for longer, is stalled: the pool kills it, its unit counts an attempt and is
  redone on a fresh actor. The timeout is given, or adaptive: max(600 s, 20x the slowest batch seen).
- Placement: an actor requested more than `placement_timeout` ago and not placed is given up; with no actor
  placed or loading and none that can still come, the job cannot go on.
- After stop (the lease lost, a signal, a fatal result) no unit is handed out and no result is committed.
"""

from __future__ import annotations

import collections
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ..output.plan import WorkUnit

# the counters a work unit's result carries (summed over slices and over the job by the runner)
UNIT_COUNTS = ("rows", "errors", "truncated", "real_tokens", "padded_tokens", "generated_tokens", "nonfinite")
STALL_FLOOR = 600.0  # seconds: the adaptive stall timeout never goes below this
STALL_BATCHES = 20  # ... nor below this many times the slowest model batch seen


@dataclass
class UnitResult:
    ok: bool
    temp: str | None = None  # the finished temporary file, relative to the output
    stats: dict[str, Any] = field(default_factory=dict)  # UNIT_COUNTS, seconds, node, host, pid, peak memory
    error: str | None = None
    permanent: bool = False  # retrying cannot help: this shard fails
    fatal: str = ""  # the job cannot go on: "model changed" (on disk), "output unwritable" (full, read-only)


@dataclass
class MergeTask:
    """Concatenate a sliced shard's finished parts into its one output file."""

    shard: str
    temps: list[str]
    stats: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.shard}#merge"


Task = WorkUnit | MergeTask


class ActorState(enum.Enum):
    REQUESTED = "requested"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"


@dataclass
class ActorRecord:
    state: ActorState
    since: float  # when it entered this state (driver clock)
    heard: float  # when it last answered (driver clock)
    busy_for: float = 0.0  # what it last said: seconds inside its current model batch (or model load)
    task: Task | None = None
    rows: int = 0  # rows of its current unit processed so far


@dataclass
class Commit:
    shard: str
    temp: str
    stats: dict[str, Any]
    identity: dict[str, Any] | None
    attempts: int


@dataclass
class Failure:
    shard: str
    reason: str
    attempts: int


@dataclass
class Stalled:
    actor: Hashable
    reason: str


class Dispatcher:
    def __init__(self, units: list[WorkUnit], max_attempts: int = 3, stall_timeout: float | None = None,
                 placement_timeout: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_attempts, self.stall_timeout, self.placement_timeout = max_attempts, stall_timeout, placement_timeout
        self.clock = clock
        self.queue: collections.deque[Task] = collections.deque(units)
        self.actors: dict[Hashable, ActorRecord] = {}
        self.attempts: collections.Counter[str] = collections.Counter()
        self.parts: dict[str, dict[int, UnitResult]] = collections.defaultdict(dict)
        self.failed_shards: set[str] = set()
        self.slowest_batch = 0.0
        self.stopped: str | None = None
        self.fatal: UnitResult | None = None  # the result that stopped the job

    # -- the work -----------------------------------------------------------------------------------------------
    def add(self, units: list[WorkUnit]) -> None:
        """More units (outputs found missing at the end are redone)."""
        self.queue.extend(units)

    @property
    def finished(self) -> bool:
        busy = any(a.state == ActorState.BUSY for a in self.actors.values())
        return not busy and (self.stopped is not None or not self._pending())

    def _pending(self) -> bool:
        return bool(self.queue)  # a failed shard's units leave the queue when it fails

    def wants_actors(self) -> int:
        """How many more actors the remaining work could use now (queued units beyond the live actors)."""
        live = sum(1 for a in self.actors.values() if a.state != ActorState.BUSY)
        return 0 if self.stopped else max(0, len(self.queue) - live)

    def stop(self, reason: str) -> None:
        self.stopped = self.stopped or reason

    # -- actors -------------------------------------------------------------------------------------------------
    def requested(self, actor: Hashable) -> None:
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.REQUESTED, now, now)

    def placed(self, actor: Hashable) -> None:
        """The actor exists on a node and starts loading the model."""
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.LOADING, now, now)

    def loaded(self, actor: Hashable) -> None:
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.IDLE, now, now)

    def live(self) -> int:
        """Actors placed (loading, idle or busy)."""
        return sum(1 for a in self.actors.values() if a.state != ActorState.REQUESTED)

    def unplaced(self) -> list[Hashable]:
        """Actors requested longer than the placement timeout ago and still not placed: to give up."""
        now = self.clock()
        return [k for k, a in self.actors.items()
                if a.state == ActorState.REQUESTED and now - a.since > self.placement_timeout]

    def idle(self) -> list[Hashable]:
        return [k for k, a in self.actors.items() if a.state == ActorState.IDLE]

    def next(self, actor: Hashable) -> Task | None:
        """The task for an idle actor, or None (nothing left, or stopped)."""
        record = self.actors[actor]
        assert record.state == ActorState.IDLE, record.state
        if self.stopped:
            return None
        if self.queue:
            task = self.queue.popleft()
            now = self.clock()
            self.actors[actor] = ActorRecord(ActorState.BUSY, now, now, task=task)
            return task
        return None

    def heartbeat(self, actor: Hashable, rows: int = 0, busy_for: float = 0.0, slowest: float = 0.0) -> None:
        """The actor answered: rows of its current unit so far, seconds inside its current batch (or load),
        the slowest batch it has run."""
        record = self.actors.get(actor)
        if record is None:
            return
        record.heard = self.clock()
        record.busy_for = max(0.0, busy_for)
        if record.state == ActorState.BUSY:
            record.rows = max(record.rows, rows)
        self.slowest_batch = max(self.slowest_batch, slowest)

    @property
    def timeout(self) -> float:
        if self.stall_timeout is not None:
            return self.stall_timeout
        return max(STALL_FLOOR, STALL_BATCHES * self.slowest_batch)

    def stalled(self) -> list[Stalled]:
        """Actors (loading or busy) with no progress for the timeout: the pool kills them, then calls lost()."""
        now, timeout, found = self.clock(), self.timeout, []
        for actor, record in self.actors.items():
            if record.state not in (ActorState.LOADING, ActorState.BUSY):
                continue
            doing = f"unit {record.task.key}" if record.task else "loading the model"
            silent = now - record.heard
            if silent > timeout:
                found.append(Stalled(actor, f"actor stalled ({doing}): no progress for {timeout:.0f} s (it "
                                            f"stopped answering {silent:.0f} s ago)"))
            elif record.busy_for + silent > timeout:
                found.append(Stalled(actor, f"actor stalled ({doing}): no progress for {timeout:.0f} s (inside "
                                            f"one {'model batch' if record.task else 'load'} for "
                                            f"{record.busy_for + silent:.0f} s)"))
        return found

    def rows_in_flight(self) -> int:
        return sum(a.rows for a in self.actors.values() if a.state == ActorState.BUSY)

    # -- results ------------------------------------------------------------------------------------------------
    def record(self, actor: Hashable, outcome: UnitResult) -> list[Commit | Failure]:
        """The actor's task ended with `outcome`; the actor is idle again. Returns what the runner must do."""
        record = self.actors[actor]
        task = record.task
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.IDLE, now, now)
        return self._outcome(task, outcome)

    def lost(self, actor: Hashable, reason: str) -> list[Commit | Failure]:
        """The actor is gone (died, killed for a stall, never placed); its task, if any, failed."""
        record = self.actors.pop(actor, None)
        if record is None or record.task is None:
            return []
        return self._outcome(record.task, UnitResult(False, error=reason))

    def _outcome(self, task: Task, outcome: UnitResult) -> list[Commit | Failure]:
        key = task.key
        if not outcome.ok:
            self.attempts[key] += 1
            if outcome.fatal:
                self.fatal = outcome
                self.stop(outcome.error or "fatal")
                return []
            if task.shard in self.failed_shards:
                return []
            if not outcome.permanent and self.attempts[key] < self.max_attempts:
                self.queue.append(task)
                return []
            self.failed_shards.add(task.shard)
            self.parts.pop(task.shard, None)
            self.queue = collections.deque(t for t in self.queue if t.shard != task.shard)
            return [Failure(task.shard, outcome.error or "failed", self.attempts[key])]
        if self.stopped:
            return []  # the output is not ours to commit to any more (or the job is ending)
        if isinstance(task, MergeTask):
            return [Commit(task.shard, outcome.temp, task.stats, task.stats.get("input_identity"),
                           self._attempts_of(task.shard) + 1)]
        if task.parts == 1:
            return [Commit(task.shard, outcome.temp, outcome.stats, task.identity, self.attempts[key] + 1)]
        if task.shard in self.failed_shards:
            return []
        finished = self.parts[task.shard]
        finished[task.part] = outcome
        if len(finished) == task.parts:  # all slices in: one actor concatenates them, in order
            slices = [finished[i] for i in range(task.parts)]
            del self.parts[task.shard]
            merged = {k: sum(s.stats.get(k, 0) for s in slices) for k in (*UNIT_COUNTS, "seconds")}
            merged.update(node=",".join(sorted({str(s.stats.get("node", "")) for s in slices})), parts=task.parts,
                          input_identity=task.identity)
            self.queue.appendleft(MergeTask(task.shard, [s.temp for s in slices], merged))
        return []

    def _attempts_of(self, shard: str) -> int:
        """The most attempts any unit of a shard needed, less one (the attempt count of its entry)."""
        return max((n for k, n in self.attempts.items() if k == shard or k.startswith(shard + "#")), default=0)
