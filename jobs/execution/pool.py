"""The Ray side of a run: actors, `ray.wait`, pings, and deaths turned into results for the dispatcher.

The dispatcher decides which work an idle actor gets, which actors are stalled or unplaced, how many to
request, and what a result, a load or a death means; the pool submits, waits (never without a deadline), kills
and reports. What only Ray can tell, the pool judges itself: the cluster gone (its GCS, or every node that could
host an actor). It also watches the
cluster itself: the GCS by a TCP connection to its address every second (Ray would otherwise end this
process with only its own log line after 60 s without it), and, when an actor dies with its node, whether any
node that can host an actor is left.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from persimmon.cpu import passive_wait_env
from pipelines.errors import one_line

from ..errors import ClusterFailed
from ..output.lease import this_machine
from .dispatcher import Cancel, Commit, Discard, Dispatcher, Failure, Merge, UnitResult
from .worker import CONCURRENCY_GROUPS, UnitWorker

class Reply(enum.Enum):
    """What an object ref the pool waits on will answer."""

    READY = "ready"  # the actor exists: its pid, machine and node
    LOAD = "load"  # its model load ended (a UnitResult)
    PING = "ping"  # its heartbeat: rows of its unit so far, seconds in its current batch
    WORK = "work"  # its work ended (a UnitResult)


GCS_GRACE = 10.0  # seconds of refused connections before the GCS counts as dead
WAIT = 0.5  # the longest single wait of the loop


@dataclass
class Actor:
    handle: Any
    number: int
    pid: int | None = None
    machine: str | None = None
    node: str | None = None

    def __hash__(self) -> int:
        return self.number

    def __eq__(self, other) -> bool:
        return isinstance(other, Actor) and other.number == self.number

    def __repr__(self) -> str:
        return f"actor {self.number}" + (f" (pid {self.pid})" if self.pid else "")


def describe_death(exc: BaseException) -> str:
    """One line for an actor that died: out of memory said so, with what to do about it."""
    text = str(exc)
    lowered = text.lower()
    # Ray's memory monitor says so; a generic death lists the OOM killer among possible causes, which is
    # not a diagnosis (a SIGKILL from anyone reads the same)
    if isinstance(exc, getattr(ray.exceptions, "OutOfMemoryError", ())) or "low on memory" in lowered or \
            "memory pressure" in lowered or "out of memory" in lowered:
        return ("actor died: out of memory (Ray killed it for using too much memory): lower --batch-tokens, "
                "or use fewer --actors per node")
    if "unexpectedly" in lowered and "oom killer" in lowered:  # the worker process died: the node may live
        return ("actor died: its process exited unexpectedly (killed by a signal, by the kernel's OOM killer, "
                "or a crash); if memory ran out, lower --batch-tokens or use fewer --actors per node")
    if any(p in lowered for p in ("node has died", "node died", "node was marked dead", "node is dead",
                                  "raylet died", "raylet has died", "node crashed")):
        return "actor died: its node died"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("class_name", "actor_id", "pid:", "namespace", "ip:")) and \
                "died unexpectedly before finishing" not in line:
            return f"actor died: {one_line(line, 200)}"
    return f"actor died: {type(exc).__name__}"


class GcsWatch:
    """A thread that connects to the GCS every second; `dead` once it has refused for GCS_GRACE seconds."""

    def __init__(self, address: str | None) -> None:
        self.dead: str | None = None
        self._stop = threading.Event()
        if not address or ":" not in address:
            return
        host, port = address.rsplit(":", 1)
        self.address = address
        threading.Thread(target=self._watch, args=(host, int(port)), name="persimmon-batch-gcs", daemon=True).start()

    def _watch(self, host: str, port: int) -> None:
        failing_since = None
        while not self._stop.wait(1.0):
            try:
                with socket.create_connection((host, port), timeout=2):
                    failing_since = None
            except OSError:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > GCS_GRACE:
                    self.dead = (f"the Ray cluster's GCS at {self.address} stopped answering "
                                 f"({GCS_GRACE:.0f} s without a connection): the cluster is gone")
                    return

    def stop(self) -> None:
        self._stop.set()


def cpu_used(pid: int) -> tuple[int, int] | None:
    """(the process's start time, its user + system CPU ticks) from /proc, or None where there is no such
    process or no /proc. The start time tells a reused pid from the actor's own process."""
    try:
        fields = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
        return int(fields[19]), int(fields[11]) + int(fields[12])  # starttime, utime + stime (stat(5))
    except (OSError, IndexError, ValueError):
        return None


def gcs_address() -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


class Pool:
    """Actors of one run. `step()` moves the run forward by at most WAIT seconds and returns what to commit
    or fail; `on_note` hears what the user should see (an actor stalled, replaced, given up)."""

    def __init__(self, dispatcher: Dispatcher, worker_args: tuple, resources: dict[str, Any],
                 on_note: Callable[[str], None]) -> None:
        self.dispatcher, self.worker_args, self.on_note = dispatcher, worker_args, on_note
        # OpenMP threads that sleep between parallel regions: on a node shared with other work, spinning threads
        # hold cores the others need (persimmon.cpu); the variable must be there before the actor loads torch
        env = passive_wait_env()
        self.remote = ray.remote(concurrency_groups=CONCURRENCY_GROUPS, max_restarts=0)(UnitWorker).options(
            scheduling_strategy="SPREAD", **({"runtime_env": {"env_vars": env}} if env else {}), **resources)
        self.resources = resources
        self.refs: dict[Any, tuple[Reply, Actor]] = {}  # object ref -> (what it answers, whose)
        self.pinged: dict[Actor, float] = {}  # actor -> when its outstanding ping was sent
        self.cpu_seen: dict[Actor, tuple[int, int]] = {}  # actor on this machine -> its process's cpu_used()
        self.actors: dict[int, Actor] = {}
        self.numbers = 0
        self.loaded_once = threading.Event()
        self.gcs = GcsWatch(gcs_address())
        self.abandoned = False  # the cluster is gone: no more Ray calls
        self.niced_told = False  # a niced actor was reported (once a run)

    # -- actors -------------------------------------------------------------------------------------------------
    def request(self, count: int) -> None:
        for _ in range(count):
            self.numbers += 1
            actor = Actor(self.remote.remote(*self.worker_args), self.numbers)
            self.actors[actor.number] = actor
            self.dispatcher.requested(actor)
            self.refs[actor.handle.ready.remote()] = (Reply.READY, actor)

    def _forget(self, actor: Actor) -> None:
        self.actors.pop(actor.number, None)
        self.pinged.pop(actor, None)
        self.cpu_seen.pop(actor, None)
        for ref in [r for r, (_, a) in self.refs.items() if a == actor]:
            del self.refs[ref]

    def kill(self, actor: Actor, stalled: bool = False) -> None:
        """Kill an actor for good. A stalled process may never handle Ray's request (a SIGSTOPped one does not),
        so a stalled actor on this machine also gets SIGKILL by pid."""
        self._forget(actor)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass
        if stalled and actor.pid and actor.machine == this_machine():
            try:
                os.kill(actor.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_all(self) -> None:
        if self.abandoned:
            return
        for actor in list(self.actors.values()):
            self.kill(actor)
        self.gcs.stop()

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[Commit | Failure | Discard]:
        """Move the run on; returns what the runner executes (a cancel is the pool's to send)."""
        decisions = []
        for decision in self._step():
            if isinstance(decision, Cancel):
                actor = decision.actor
                if actor.number in self.actors:  # fire and forget: a late cancel names an attempt that is over
                    actor.handle.cancel.remote(decision.token)
            else:
                decisions.append(decision)
        while self.dispatcher.notes:
            self.on_note(self.dispatcher.notes.pop(0))
        return decisions

    def _step(self) -> list[Commit | Failure | Cancel | Discard]:
        if self.gcs.dead:
            self.abandoned = True
            raise ClusterFailed(f"{self.gcs.dead}; what is committed is kept: rerun the same command to resume")
        decisions: list[Commit | Failure | Cancel | Discard] = []
        self._assign()
        self._ping()
        if self.refs:
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=WAIT)
            if ready:
                ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            for ref in ready:
                if ref in self.refs:
                    decisions += self._handle(ref, *self.refs.pop(ref))
        else:
            time.sleep(WAIT / 5)
        for stalled in self.dispatcher.stalled():
            self.on_note(f"{stalled.actor}: {stalled.reason}; killed, its work is redone on a fresh actor")
            self.kill(stalled.actor, stalled=True)
            decisions += self.dispatcher.lost(stalled.actor, stalled.reason)
        for actor in self.dispatcher.give_up_unplaced():  # raises ClusterFailed when none is left
            self.kill(actor)
            self.on_note(f"{actor} could not be placed in {self.dispatcher.placement_timeout:.0f} s: going on with "
                         f"{len(self.actors)} actors")
        self._replace()
        return decisions

    def _assign(self) -> None:
        for actor in self.dispatcher.idle():
            work = self.dispatcher.next(actor)
            if work is None:
                break
            if isinstance(work, Merge):
                ref = actor.handle.merge.remote(work.shard, work.temps)
            else:
                ref = actor.handle.process.remote(work, self.dispatcher.actors[actor].token)
            self.refs[ref] = (Reply.WORK, actor)

    def _ping(self) -> None:
        interval = min(2.0, self.dispatcher.timeout / 5)
        now = time.monotonic()
        for actor in list(self.actors.values()):
            if actor.pid is None or now - self.pinged.get(actor, 0.0) < interval:
                continue
            if actor.machine == this_machine():  # a process using CPU is alive, answering or not
                used, seen = cpu_used(actor.pid), self.cpu_seen.get(actor)
                if used is not None and (seen is None or used[0] == seen[0]):  # the same process
                    if seen is not None and used[1] > seen[1]:
                        self.dispatcher.alive(actor)
                    self.cpu_seen[actor] = used
            if any(kind == Reply.PING and a == actor for kind, a in self.refs.values()):
                continue  # one outstanding ping per actor: an unanswered one is the signal
            self.pinged[actor] = now
            self.refs[actor.handle.ping.remote()] = (Reply.PING, actor)

    def _handle(self, ref, kind: Reply, actor: Actor) -> list:
        try:
            value = ray.get(ref, timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.OutOfMemoryError) as exc:
            return self._died(actor, exc)
        except ray.exceptions.GetTimeoutError:
            return self._died(actor, TimeoutError("its result could not be fetched in 10 s"))
        except ray.exceptions.RayTaskError as exc:  # a bug in the worker: the unit failed, the actor lives
            if kind == Reply.WORK:
                return self.dispatcher.record(actor, UnitResult(False, error=one_line(exc, 300, with_type=True)))
            return self._died(actor, exc)
        if kind == Reply.READY:
            actor.pid, actor.machine, actor.node = value["pid"], value["machine"], value["node"]
            self.dispatcher.placed(actor)
            if value["niceness"] > 0 and not self.niced_told:
                self.niced_told = True
                self.on_note(f"note: the actors run at niceness {value['niceness']} (Ray's default for its workers): "
                             "beside other work on a node they get little of its CPU; nodes started with "
                             "RAY_worker_niceness=0 give them a fair share")
            self.refs[actor.handle.load.remote()] = (Reply.LOAD, actor)
        elif kind == Reply.LOAD:
            self.dispatcher.load_ended(actor, value)  # raises JobFailed when no actor could load the model
            if value.ok:
                self.loaded_once.set()
        elif kind == Reply.PING:
            self.pinged[actor] = time.monotonic()
            self.dispatcher.heartbeat(actor, value["rows"], value["busy_for"], value["slowest"])
        else:
            self.dispatcher.heartbeat(actor)
            return self.dispatcher.record(actor, value)
        return []

    def _died(self, actor: Actor, exc: BaseException) -> list:
        reason = describe_death(exc)
        self._forget(actor)
        decisions = self.dispatcher.died(actor, reason)  # raises JobFailed past the start-up failure limit
        if not self.dispatcher.stopped:
            self.on_note(f"{actor}: {reason}; its work is redone on a fresh actor")
        self._check_nodes(reason)
        return decisions

    def _check_nodes(self, reason: str) -> None:
        """After a death: is any node left that can host an actor? Without one, the job cannot go on."""
        try:
            nodes = ray.nodes()
        except Exception:
            return  # the GCS watch decides about the GCS
        alive = [n for n in nodes if n.get("Alive")]
        dead = [n for n in nodes if not n.get("Alive")]
        fits = [n for n in alive if all(n.get("Resources", {}).get(k, 0) >= v for k, v in
                                        (("CPU", self.resources.get("num_cpus", 1)),
                                         ("GPU", self.resources.get("num_gpus", 0))) if v)]
        if not fits:
            names = ", ".join(sorted(n.get("NodeManagerAddress", "?") for n in dead)) or "unknown"
            self.abandoned = True
            raise ClusterFailed(f"the Ray node {names} died ({reason}) and no node is left to run the actors; "
                                "what is committed is kept: rerun the same command to resume")

    def _replace(self) -> None:
        """Request the actors the dispatcher asks for (raises ClusterFailed when none is left)."""
        wanted = self.dispatcher.to_request()
        if wanted > 0:
            self.request(wanted)
