"""The dispatcher (jobs/execution/dispatcher.py) driven by a simulated pool on a simulated clock: what its
policy does to a job's makespan, and what it costs the driver, for pools and jobs far larger than this machine.

    .venv/bin/python bench/sim_dispatcher.py [--actors 8,64,512] [--units 1000,10000,100000] [--seed 0]

Units: sizes (text bytes) lognormal (sigma 0.6), planned longest first as the runner plans them; an attempt
lasts size x the pool's rate x noise (lognormal, sigma 0.1), and 0.3% of attempts land on a slow node and take
10x as long (the stragglers; a backup attempt draws its own luck). The pool is simulated as the real one
behaves: it hands work to idle actors at every step (every 2 s here, as often as the actors are pinged), and
reports progress (rows so far) with every ping. The real Dispatcher class decides everything.

Printed per (actors, units): makespan / ideal without and with backups, where ideal = the work of all units
(noise included, straggling excluded) / actors; backups started and won; and the driver's CPU time per unit
spent in the dispatcher's calls (it should stay flat as the unit count grows).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.execution.dispatcher import Cancel, Dispatcher, UnitResult  # noqa: E402
from jobs.planning.units import WorkUnit  # noqa: E402

STEP = 2.0  # simulated seconds between the pool's steps
MEDIAN_SECONDS = 60.0  # a unit's median duration
STRAGGLE_P, STRAGGLE_X = 0.003, 10.0
ROWS = 1000  # rows per unit (progress is reported in rows)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(actors: int, n_units: int, backups: bool, seed: int) -> dict:
    rng = random.Random(seed)
    sizes = [rng.lognormvariate(0, 0.6) for _ in range(n_units)]
    noise = [rng.lognormvariate(0, 0.1) for _ in range(n_units)]
    units = [WorkUnit(f"s{i:06d}.parquet", rows=ROWS, work=round(sizes[i] * 1e6)) for i in range(n_units)]
    units.sort(key=lambda u: -u.work)
    base = {u.key: sizes[int(u.shard[1:7])] * noise[int(u.shard[1:7])] * MEDIAN_SECONDS for u in units}
    ideal = sum(base.values()) / actors
    clock = Clock()
    dispatcher = Dispatcher(units, max_attempts=3, stall_timeout=1e9, clock=clock, backup_tasks=backups)
    cpu = 0.0

    def timed(fn, *args):
        nonlocal cpu
        start = time.process_time()
        value = fn(*args)
        cpu += time.process_time() - start
        return value

    for a in range(actors):
        timed(dispatcher.requested, a)
        timed(dispatcher.placed, a)
        timed(dispatcher.loaded, a)
    ends: list[tuple[float, int, int]] = []  # (end time, actor, token)
    running: dict[int, tuple[int, float, float]] = {}  # actor -> (token, start, duration)
    done = 0
    while not timed(lambda: dispatcher.finished):
        for actor in timed(dispatcher.idle):  # the pool's _assign
            task = timed(dispatcher.next, actor)
            if task is None:
                break
            slow = STRAGGLE_X if rng.random() < STRAGGLE_P else 1.0
            duration = base[task.key] * slow
            token = dispatcher.actors[actor].token
            running[actor] = (token, clock.now, duration)
            heapq.heappush(ends, (clock.now + duration, actor, token))
        step_end = clock.now + STEP
        while ends and ends[0][0] <= step_end:  # results that arrive during this step
            end, actor, token = heapq.heappop(ends)
            if running.get(actor, (None,))[0] != token:
                continue  # cancelled and reassigned: that attempt is gone
            clock.now = end
            del running[actor]
            for decision in timed(dispatcher.record, actor, UnitResult(True, temp=f"t{token}")):
                if isinstance(decision, Cancel):  # the twin stops at its next batch: here, at once
                    running.pop(decision.actor, None)
                    timed(dispatcher.record, decision.actor, UnitResult(False, error="cancelled"))
                elif hasattr(decision, "shard"):
                    done += 1
        clock.now = step_end
        for actor, (token, start, duration) in running.items():  # the pings of this step
            timed(dispatcher.heartbeat, actor, int(ROWS * min(1.0, (clock.now - start) / duration)))
        timed(dispatcher.stalled)
        if not ends and not running and not dispatcher.queue:
            break
    makespan = max(clock.now - STEP, 0.0)
    assert done == n_units, (done, n_units)
    return {"ratio": makespan / ideal, "started": dispatcher.backups["started"], "won": dispatcher.backups["won"],
            "cpu_us": cpu / n_units * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", default="8,64,512")
    parser.add_argument("--units", default="1000,10000,100000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'actors':>6} {'units':>7} | {'no backups':>10} | {'backups':>8} {'started':>7} {'won':>5} | "
          f"{'driver CPU per unit (us): no backups':>36} {'backups':>8}")
    for actors in map(int, args.actors.split(",")):
        for n in map(int, args.units.split(",")):
            if n < actors:
                continue
            off = simulate(actors, n, False, args.seed)
            on = simulate(actors, n, True, args.seed)
            print(f"{actors:>6} {n:>7} | {off['ratio']:>10.3f} | {on['ratio']:>8.3f} {on['started']:>7} "
                  f"{on['won']:>5} | {off['cpu_us']:>36.1f} {on['cpu_us']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
