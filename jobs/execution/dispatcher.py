"""The runner's policy, as code without Ray or a filesystem: which unit an idle actor gets, what a result
means, when an actor is stalled, when placement has failed, when the job stops.

The pool (pool.py) turns actors and Ray's futures into calls of this class; the runner executes what it
decides (commits, failures). A clock is injected, so every rule is tested in milliseconds
(tests/jobs/execution/test_dispatcher.py).

Actors move through: requested -> loading (placed, loading the model) -> idle <-> busy -> gone.
- An idle actor gets the next unit of the queue (a merge of a sliced shard's parts first).
- A unit whose attempt failed is queued again until it has failed `max_attempts` times; one that cannot
  succeed (a bad shard: `permanent`) fails at once; one whose failure means the job cannot go on (the model
  changed on disk: `fatal`) stops the job.
- Slices of a shard are merged, in order, once every part is in; the merge is a unit of its own.
- Liveness, on the driver's clock: an actor with no sign of life for the stall timeout, or that reports
  being inside one model batch for longer, is stalled: the pool kills it, its unit counts an attempt and is
  redone on a fresh actor. The timeout is given, or adaptive: max(600 s, 20x the slowest batch seen). A sign
  of life is an answered ping, or (for an actor on the driver's machine) its process's CPU time moving: a
  process loading torch and the model on a crowded machine may not answer for a while, a stopped one never
  uses CPU. A model load is one long step with no progress to report: it gets at least 600 s (LOAD_FLOOR)
  whatever a short stall timeout says, since killing a slow load only starts another.
- Placement: an actor requested more than `placement_timeout` ago and not placed is given up, and the run
  goes on with one actor fewer (the cluster has no room for it: asking again would wait as long); with no
  actor left, the job cannot go on (ClusterFailed).
- Start-up: a model load that fails fails the job (JobFailed: every actor would meet it), one that finds the
  model changed stops it (fatal); actors that die before taking work are replaced until `max_attempts` per
  actor of the pool have died so, then the job fails.
- Backups (MapReduce's backup tasks, Spark's speculation): with `backup_tasks` on, an idle actor with the queue
  empty starts a second attempt of the running unit that is furthest behind its peers: running longer than
  BACKUP_FACTOR times what its size predicts from the median rate (seconds per byte of text) of the units
  finished so far, and with more left to do, by its own rate so far, than a fresh attempt would need. Each
  unit gets at most one backup. The first attempt to finish is the one recorded; the other is cancelled
  (the pool tells its actor) and whatever it still returns is discarded. The job does not wait for it.
- After stop (the lease lost, a signal, a fatal result) no unit is handed out and no result is committed.

Every call costs the same however many units the job has (the queue is a deque, the median is kept by two
heaps); the calls that look at actors cost O(actors). bench/sim_dispatcher.py measures both.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ..errors import ClusterFailed, JobFailed
from ..planning.units import WorkUnit

# the counters a work unit's result carries (summed over slices and over the job by the runner)
UNIT_COUNTS = ("rows", "errors", "truncated", "real_tokens", "padded_tokens", "generated_tokens", "nonfinite")
STALL_FLOOR = 600.0  # seconds: the adaptive stall timeout never goes below this
STALL_BATCHES = 20  # ... nor below this many times the slowest model batch seen
LOAD_FLOOR = 600.0  # seconds: a model load that shows signs of life is stalled only after this long
BACKUP_FACTOR = 1.5  # a unit is behind once it has run this many times what the median rate predicts
BACKUP_MIN_SECONDS = 5.0  # ... and at least this long: shorter units are not worth a second attempt


class Fatal(str, enum.Enum):
    """Why a unit's result stops the whole job (another attempt, or another unit, would meet it too)."""

    MODEL_CHANGED = "model changed"  # the checkpoint on disk is no longer the one the job pinned
    OUTPUT_UNWRITABLE = "output unwritable"  # the output's filesystem is full or read-only


@dataclass
class UnitResult:
    ok: bool
    temp: str | None = None  # the finished temporary file, relative to the output
    stats: dict[str, Any] = field(default_factory=dict)  # UNIT_COUNTS, seconds, node, host, pid, peak memory
    error: str | None = None
    permanent: bool = False  # retrying cannot help: this shard fails
    fatal: Fatal | None = None  # the job cannot go on


@dataclass
class Merge:
    """Concatenate a sliced shard's finished parts into its one output file."""

    shard: str
    temps: list[str]
    stats: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.shard}#merge"

    @property
    def ident(self) -> tuple:
        return (self.shard, "merge")


Work = WorkUnit | Merge  # what an actor is given


@dataclass
class Cancel:
    """Another attempt of the actor's unit finished first: the pool tells the actor to stop it."""

    actor: Hashable
    token: int
    key: tuple  # the unit's identity (WorkUnit.ident)


@dataclass
class Discard:
    """A finished temporary file nobody will commit (its twin attempt was recorded first): the runner deletes it."""

    temp: str


class RunningMedian:
    """The median of the values added so far, in O(log n) per value (two heaps)."""

    def __init__(self) -> None:
        self.low: list[float] = []  # a max-heap (negated) of the lower half
        self.high: list[float] = []  # a min-heap of the upper half

    def add(self, value: float) -> None:
        if self.low and value > -self.low[0]:
            heapq.heappush(self.high, value)
        else:
            heapq.heappush(self.low, -value)
        if len(self.low) > len(self.high) + 1:
            heapq.heappush(self.high, -heapq.heappop(self.low))
        elif len(self.high) > len(self.low):
            heapq.heappush(self.low, -heapq.heappop(self.high))

    def __len__(self) -> int:
        return len(self.low) + len(self.high)

    @property
    def median(self) -> float:
        if len(self.low) > len(self.high):
            return -self.low[0]
        return (-self.low[0] + self.high[0]) / 2


def work_of(unit: WorkUnit) -> float:
    """A unit's size for rates: its text bytes where the planner knew them, else its rows."""
    return float(unit.work or unit.rows or 1)


class ActorState(enum.Enum):
    REQUESTED = "requested"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"


@dataclass
class ActorRecord:
    state: ActorState
    since: float  # when it entered this state (driver clock)
    heard: float  # when it last answered a ping (driver clock)
    alive_at: float  # its last sign of life: an answer, or its process's CPU time moving
    busy_for: float = 0.0  # what it last said: seconds inside its current model batch (or model load)
    work: Work | None = None
    rows: int = 0  # rows of its current unit processed so far
    token: int = 0  # this assignment's number: a cancel names it, so it never stops a later unit
    backup: bool = False  # a second attempt of a unit that another actor is still running
    stale: bool = False  # its unit was planned again (redone): this attempt's end no longer counts


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
                 placement_timeout: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 backup_tasks: bool = False, target: int = 1, needs: str = "") -> None:
        self.max_attempts, self.stall_timeout, self.placement_timeout = max_attempts, stall_timeout, placement_timeout
        self.target = target  # the actors the run keeps (fewer once the cluster had no room for some)
        self.needs = f" (each needs {needs})" if needs else ""  # what one actor asks of the cluster, for messages
        self.start_failures = 0  # actors that died before they could take work
        self.clock, self.backup_tasks = clock, backup_tasks
        self.running: dict[tuple, set[Hashable]] = collections.defaultdict(set)  # unit identity -> its actors
        self.done: set[tuple] = set()  # units whose result was recorded: a twin attempt's result is discarded
        self.backed_up: set[tuple] = set()  # units that got their one backup
        self.rates = RunningMedian()  # seconds per unit of work of the attempts recorded
        self.tokens = itertools.count(1)
        self.notes: list[str] = []  # what the user should hear (backups started, won); the pool takes them
        self.backups = {"started": 0, "won": 0}
        self.queue: collections.deque[Work] = collections.deque(units)
        self.actors: dict[Hashable, ActorRecord] = {}
        self.attempts: collections.Counter[tuple] = collections.Counter()  # by unit identity
        self.parts: dict[str, dict[int, UnitResult]] = collections.defaultdict(dict)
        self.failed_shards: set[str] = set()
        self.slowest_batch = 0.0
        self.stopped: str | None = None
        self.fatal: UnitResult | None = None  # the result that stopped the job

    # -- the work -----------------------------------------------------------------------------------------------
    def add(self, units: list[WorkUnit]) -> None:
        """More units (outputs found missing at the end are redone)."""
        shards = {u.shard for u in units}
        self.done = {k for k in self.done if k[0] not in shards}  # identities start with the shard
        self.backed_up = {k for k in self.backed_up if k[0] not in shards}
        for actor, record in self.actors.items():  # an attempt still running from before counts no more
            if record.state == ActorState.BUSY and record.work.shard in shards:
                record.stale = True
                self.running.get(record.work.ident, set()).discard(actor)
        self.queue.extend(units)

    def _wanted(self, record: ActorRecord) -> bool:
        """A busy actor whose result is still wanted (not a twin whose unit was recorded, nor a stale one)."""
        return record.state == ActorState.BUSY and not record.stale and record.work.ident not in self.done

    @property
    def finished(self) -> bool:
        """Nothing left to hand out and no unit in flight whose result is still wanted (an attempt whose twin
        was recorded is not waited for)."""
        busy = any(self._wanted(a) for a in self.actors.values())
        return not busy and (self.stopped is not None or not self._pending())

    def _pending(self) -> bool:
        return bool(self.queue)  # a failed shard's units leave the queue when it fails

    def wants_actors(self) -> int:
        """How many more actors the remaining work could use now (queued units beyond the live actors)."""
        live = sum(1 for a in self.actors.values() if a.state != ActorState.BUSY)
        return 0 if self.stopped else max(0, len(self.queue) - live)

    def to_request(self) -> int:
        """Actors to request now: the pool kept at its size while there is work for more (a dead actor is
        replaced). A pool with no actor left is give_up_unplaced's to end."""
        if self.stopped:
            return 0
        return max(0, min(self.target - len(self.actors), self.wants_actors()))

    def stop(self, reason: str) -> None:
        self.stopped = self.stopped or reason

    # -- actors -------------------------------------------------------------------------------------------------
    def requested(self, actor: Hashable) -> None:
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.REQUESTED, now, now, now)

    def placed(self, actor: Hashable) -> None:
        """The actor exists on a node and starts loading the model."""
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.LOADING, now, now, now)

    def loaded(self, actor: Hashable) -> None:
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.IDLE, now, now, now)

    def load_ended(self, actor: Hashable, outcome: UnitResult) -> None:
        """The actor's model load ended. Loaded: idle. The model changed on disk: the job stops (fatal). Any
        other failure would meet every actor: the job fails (JobFailed)."""
        if outcome.ok:
            self.loaded(actor)
        elif outcome.fatal:
            self.fatal = outcome
            self.stop(outcome.error or "fatal")
        else:
            self.actors.pop(actor, None)
            raise JobFailed(f"the workers could not load the model: {outcome.error}")

    def died(self, actor: Hashable, reason: str) -> list[Commit | Failure | Cancel | Discard]:
        """The actor died. Its work failed (lost()); one that died before it could take work counts towards
        the start-up limit: max_attempts per actor of the pool, then the job fails (JobFailed)."""
        record = self.actors.get(actor)
        if record is not None and record.state in (ActorState.REQUESTED, ActorState.LOADING):
            self.start_failures += 1
            if self.start_failures >= self.max_attempts * max(1, self.target):
                self.actors.pop(actor, None)
                raise JobFailed(f"the workers could not load the model: {reason}")
        return self.lost(actor, reason)

    def give_up_unplaced(self) -> list[Hashable]:
        """The actors not placed within the placement timeout, forgotten, the pool one smaller for each (the
        cluster has no room for them). Raises ClusterFailed when that leaves no actor at all."""
        gone = self.unplaced()
        for actor in gone:
            self.lost(actor, "not placed")
            self.target -= 1
        if gone and not self.actors:
            raise ClusterFailed(f"no actor could be placed on the cluster in {self.placement_timeout:.0f} s"
                                f"{self.needs} (e.g. no GPU node joined); what is committed is kept: rerun the same "
                                "command to resume")
        return gone

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

    def next(self, actor: Hashable) -> Work | None:
        """The work for an idle actor, or None (nothing left, or stopped)."""
        record = self.actors[actor]
        assert record.state == ActorState.IDLE, record.state
        if self.stopped:
            return None
        backup = False
        if self.queue:
            work = self.queue.popleft()
        elif self.backup_tasks and (work := self._straggler()) is not None:
            backup = True
        else:
            return None
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.BUSY, now, now, now, work=work, token=next(self.tokens),
                                         backup=backup)
        self.running[work.ident].add(actor)
        return work

    def _straggler(self) -> Work | None:
        """The running unit a second attempt would finish soonest relative to the first (see the module's
        docstring), or None."""
        if not len(self.rates):
            return None
        rate, now = self.rates.median, self.clock()
        best, behind = None, 0.0
        for record in self.actors.values():
            work = record.work
            if not self._wanted(record) or not isinstance(work, WorkUnit) or work.ident in self.backed_up:
                continue
            expected, elapsed = rate * work_of(work), now - record.since
            if elapsed < max(BACKUP_FACTOR * expected, BACKUP_MIN_SECONDS):
                continue
            total = max(work.rows, 1)
            remaining = elapsed * (total - record.rows) / record.rows if record.rows else math.inf
            if remaining > expected and remaining - expected > behind:
                best, behind = (work, elapsed / expected if expected else math.inf), remaining - expected
        if best is None:
            return None
        work, ratio = best
        self.backed_up.add(work.ident)
        self.backups["started"] += 1
        self.notes.append(f"unit {work.key} has run {ratio:.1f}x as long as its peers' median predicts: a backup "
                          "attempt started on an idle actor (the first to finish is kept)")
        return work

    def heartbeat(self, actor: Hashable, rows: int = 0, busy_for: float = 0.0, slowest: float = 0.0) -> None:
        """The actor answered: rows of its current unit so far, seconds inside its current batch (or load),
        the slowest batch it has run."""
        record = self.actors.get(actor)
        if record is None:
            return
        record.heard = record.alive_at = self.clock()
        record.busy_for = max(0.0, busy_for)
        if record.state == ActorState.BUSY:
            record.rows = max(record.rows, rows)
        self.slowest_batch = max(self.slowest_batch, slowest)

    def alive(self, actor: Hashable) -> None:
        """The actor's process used CPU since the pool last looked (a sign of life, not of progress)."""
        record = self.actors.get(actor)
        if record is not None:
            record.alive_at = self.clock()

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
            doing = f"unit {record.work.key}" if record.work else "loading the model"
            lifeless, silent = now - record.alive_at, now - record.heard
            inside = record.busy_for + silent  # in its current batch (or load), as of its last answer
            bound = timeout if record.state == ActorState.BUSY else max(timeout, LOAD_FLOOR)
            if lifeless > timeout:
                found.append(Stalled(actor, f"actor stalled ({doing}): no progress for {timeout:.0f} s (it "
                                            f"stopped answering {silent:.0f} s ago)"))
            elif inside > bound:
                found.append(Stalled(actor, f"actor stalled ({doing}): no progress for {bound:.0f} s (inside "
                                            f"one {'model batch' if record.work else 'load'} for "
                                            f"{inside:.0f} s)"))
        return found

    def rows_in_flight(self) -> int:
        return sum(a.rows for a in self.actors.values() if a.state == ActorState.BUSY)

    # -- results ------------------------------------------------------------------------------------------------
    def record(self, actor: Hashable, outcome: UnitResult) -> list[Commit | Failure | Cancel | Discard]:
        """The actor's work ended with `outcome`; the actor is idle again. Returns what the runner must do."""
        record = self.actors[actor]
        now = self.clock()
        self.actors[actor] = ActorRecord(ActorState.IDLE, now, now, now)
        return self._ended(actor, record, outcome, now)

    def lost(self, actor: Hashable, reason: str) -> list[Commit | Failure | Cancel | Discard]:
        """The actor is gone (died, killed for a stall, never placed); its work, if any, failed."""
        record = self.actors.pop(actor, None)
        if record is None or record.work is None:
            return []
        return self._ended(actor, record, UnitResult(False, error=reason), self.clock())

    def _ended(self, actor: Hashable, record: ActorRecord, outcome: UnitResult,
               now: float) -> list[Commit | Failure | Cancel | Discard]:
        """One attempt ended. With a twin attempt of the same unit: the first success is the unit's result
        (the twin is cancelled, or its late result discarded); a failure while the twin runs waits for it."""
        work = record.work
        key = work.ident
        if record.stale or key in self.done:  # planned again since, or the twin's result was recorded first
            return [Discard(outcome.temp)] if outcome.ok and outcome.temp else []
        twins = self.running.get(key, set())
        twins.discard(actor)
        if not twins:
            self.running.pop(key, None)
        if not outcome.ok and twins and not outcome.fatal:
            self.attempts[key] += 1
            return []
        if not outcome.ok:
            return self._outcome(work, outcome)
        self.done.add(key)
        if isinstance(work, WorkUnit) and not self.stopped:
            self.rates.add((now - record.since) / work_of(work))
        if record.backup:
            self.backups["won"] += 1
        cancels = [Cancel(twin, self.actors[twin].token, key) for twin in twins if twin in self.actors]
        return self._outcome(work, outcome) + cancels

    def _outcome(self, work: Work, outcome: UnitResult) -> list[Commit | Failure]:
        key = work.ident
        if not outcome.ok:
            self.attempts[key] += 1
            if outcome.fatal:
                self.fatal = outcome
                self.stop(outcome.error or "fatal")
                return []
            if work.shard in self.failed_shards:
                return []
            if not outcome.permanent and self.attempts[key] < self.max_attempts:
                self.queue.append(work)
                return []
            self.failed_shards.add(work.shard)
            self.parts.pop(work.shard, None)
            self.queue = collections.deque(t for t in self.queue if t.shard != work.shard)
            return [Failure(work.shard, outcome.error or "failed", self.attempts[key])]
        if self.stopped:
            return []  # the output is not ours to commit to any more (or the job is ending)
        if isinstance(work, Merge):
            return [Commit(work.shard, outcome.temp, work.stats, work.stats.get("input_identity"),
                           self._attempts_of(work.shard) + 1)]
        if work.parts == 1:
            return [Commit(work.shard, outcome.temp, outcome.stats, work.identity, self.attempts[key] + 1)]
        if work.shard in self.failed_shards:
            return []
        finished = self.parts[work.shard]
        finished[work.part] = outcome
        if len(finished) == work.parts:  # all slices in: one actor concatenates them, in order
            slices = [finished[i] for i in range(work.parts)]
            del self.parts[work.shard]
            merged = {k: sum(s.stats.get(k, 0) for s in slices) for k in (*UNIT_COUNTS, "seconds")}
            merged.update(node=",".join(sorted({str(s.stats.get("node", "")) for s in slices})), parts=work.parts,
                          input_identity=work.identity, threads=max(s.stats.get("threads") or 0 for s in slices))
            self.queue.appendleft(Merge(work.shard, [s.temp for s in slices], merged))
        return []

    def _attempts_of(self, shard: str) -> int:
        """The most attempts any unit of a shard needed, less one (the attempt count of its entry)."""
        return max((n for k, n in self.attempts.items() if k[0] == shard), default=0)
