"""The runner's policy without Ray or a filesystem: each rule of the dispatcher fed made-up results on a made-up
clock (milliseconds per test)."""

from __future__ import annotations


import pytest

from jobs.errors import ClusterFailed, JobFailed
from jobs.execution.dispatcher import (LOAD_FLOOR, STALL_FLOOR, Commit, Dispatcher, Failure, Fatal, Merge, UnitResult)
from jobs.planning.units import WorkUnit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ok(rows: int = 10, temp: str = "t") -> UnitResult:
    return UnitResult(True, temp, {"rows": rows, "errors": 0, "seconds": 1.0, "node": "n1"})


def with_actors(units, n=1, loaded=True, **kwargs):
    """A dispatcher with `n` actors placed and (unless `loaded` is False: still loading the model) loaded."""
    clock = Clock()
    d = Dispatcher(units, clock=clock, **kwargs)
    for a in range(n):
        d.requested(a)
        d.placed(a)
        if loaded:
            d.loaded(a)
    return d, clock


def test_idle_actors_take_units_in_order_and_a_result_is_a_commit():
    d, _ = with_actors([WorkUnit("a", rows=10), WorkUnit("b", rows=5)], n=2)
    assert d.next(0).shard == "a" and d.next(1).shard == "b"
    [commit] = d.record(0, ok(10, "ta"))
    assert isinstance(commit, Commit) and (commit.shard, commit.temp, commit.attempts) == ("a", "ta", 1)
    assert not d.finished
    d.record(1, ok(5))
    assert d.finished and d.next(0) is None


def test_a_failed_attempt_is_retried_until_max_attempts_then_the_shard_fails():
    d, _ = with_actors([WorkUnit("a")], max_attempts=3)
    for attempt in range(2):
        d.next(0)
        assert d.record(0, UnitResult(False, error="boom")) == []
    d.next(0)
    [failure] = d.record(0, UnitResult(False, error="boom"))
    assert isinstance(failure, Failure) and failure.attempts == 3 and failure.reason == "boom"
    assert d.finished


def test_a_permanent_failure_is_not_retried():
    d, _ = with_actors([WorkUnit("a")], max_attempts=3)
    d.next(0)
    [failure] = d.record(0, UnitResult(False, error="not Parquet", permanent=True))
    assert failure.attempts == 1 and d.finished


def test_a_fatal_result_stops_the_job_and_nothing_more_is_handed_out_or_committed():
    d, _ = with_actors([WorkUnit("a"), WorkUnit("b"), WorkUnit("c")], n=2)
    d.next(0)
    d.next(1)
    assert d.record(0, UnitResult(False, error="the model changed", fatal=Fatal.MODEL_CHANGED)) == []
    assert d.fatal.error == "the model changed" and d.next(0) is None
    assert d.record(1, ok()) == []  # finished after the stop: not committed
    assert d.finished


def test_slices_are_merged_in_order_once_all_parts_are_in():
    units = [WorkUnit("big", [0], 0, 2, 100, {"size": 1}), WorkUnit("big", [1], 1, 2, 50, {"size": 1})]
    d, _ = with_actors(units, n=2)
    assert [d.next(0).part, d.next(1).part] == [0, 1]
    assert d.record(1, ok(50, "p1")) == []  # the second part first: nothing to merge yet
    assert d.record(0, ok(100, "p0")) == []
    merge = d.next(0)
    assert isinstance(merge, Merge) and merge.temps == ["p0", "p1"] and merge.stats["rows"] == 150
    [commit] = d.record(0, UnitResult(True, "merged", {"rows": 150}))
    assert commit.shard == "big" and commit.temp == "merged" and commit.identity == {"size": 1}
    assert d.finished


def test_a_failed_slice_fails_its_shard_and_its_other_parts_are_dropped():
    units = [WorkUnit("big", [0], 0, 2, 100), WorkUnit("big", [1], 1, 2, 50), WorkUnit("small")]
    d, _ = with_actors(units, n=2, max_attempts=1)
    d.next(0)
    d.next(1)
    [failure] = d.record(0, UnitResult(False, error="bad page", permanent=True))
    assert failure.shard == "big"
    assert d.record(1, ok()) == []  # the other part of a failed shard: no merge
    assert d.next(1).shard == "small"


def test_an_actor_silent_for_the_stall_timeout_is_stalled_and_its_unit_redone():
    d, clock = with_actors([WorkUnit("a")], n=1, stall_timeout=10)
    d.next(0)
    clock.now += 9
    assert d.stalled() == []
    clock.now += 2
    [stalled] = d.stalled()
    assert stalled.actor == 0 and "no progress for 10 s" in stalled.reason and "stopped answering" in stalled.reason
    assert d.lost(0, stalled.reason) == []  # requeued: a fresh actor redoes it
    d.requested(1)
    d.placed(1)
    d.loaded(1)
    assert d.next(1).shard == "a"
    [commit] = d.record(1, ok())
    assert commit.attempts == 2


def test_an_actor_that_answers_but_sits_in_one_batch_is_stalled():
    d, clock = with_actors([WorkUnit("a")], n=1, stall_timeout=10)
    d.next(0)
    for _ in range(6):
        clock.now += 2
        d.heartbeat(0, rows=3, busy_for=clock.now - 1000.0)  # it answers, its batch never ends
    [stalled] = d.stalled()
    assert "inside one model batch" in stalled.reason


def test_heartbeats_with_progress_keep_a_long_unit_alive():
    d, clock = with_actors([WorkUnit("a")], n=1, stall_timeout=10)
    d.next(0)
    for i in range(50):
        clock.now += 2
        d.heartbeat(0, rows=i, busy_for=0.5)
    assert d.stalled() == [] and d.rows_in_flight() == 49


def test_the_adaptive_timeout_follows_the_slowest_batch():
    d, clock = with_actors([WorkUnit("a")], n=1)
    assert d.timeout == STALL_FLOOR
    d.next(0)
    d.heartbeat(0, rows=1, busy_for=0.0, slowest=60.0)
    assert d.timeout == 20 * 60.0
    clock.now += 1000
    assert d.stalled() == []  # 1000 s of silence is under 20x a 60 s batch
    clock.now += 300
    assert len(d.stalled()) == 1


def test_a_stalled_load_is_caught_too():
    d, clock = with_actors([WorkUnit("a")], loaded=False, stall_timeout=30)
    clock.now += 31
    [stalled] = d.stalled()
    assert "loading the model" in stalled.reason


def test_a_load_that_uses_cpu_without_answering_outlives_a_short_stall_timeout_and_a_stopped_one_does_not():
    """On a crowded machine an actor importing torch and loading the model may not answer a ping for seconds;
    its process's CPU time moving (the pool's alive()) is its sign of life. A stopped process shows none."""
    d, clock = with_actors([WorkUnit("a")], loaded=False, stall_timeout=3)
    for _ in range(120):  # two minutes of loading, never answering, using CPU
        clock.now += 1
        d.alive(0)
        assert d.stalled() == []
    clock.now += 3.5  # SIGSTOPped: no CPU, no answer
    [stalled] = d.stalled()
    assert "loading the model" in stalled.reason and "stopped answering 124 s ago" in stalled.reason


def test_a_load_gets_the_load_floor_however_short_the_stall_timeout_but_a_batch_does_not():
    d, clock = with_actors([WorkUnit("a")], loaded=False, stall_timeout=3)
    started = clock.now
    while clock.now - started < LOAD_FLOOR - 2:  # a slow load that answers: inside one load for minutes
        clock.now += 2
        d.heartbeat(0, busy_for=clock.now - started)
        assert d.stalled() == []
    clock.now += 3
    [stalled] = d.stalled()
    assert "inside one load" in stalled.reason and f"no progress for {LOAD_FLOOR:.0f} s" in stalled.reason
    d.lost(0, stalled.reason)
    d.requested(1)
    d.placed(1)
    d.loaded(1)
    d.next(1)
    for _ in range(2):  # a batch that uses CPU but neither answers nor ends: the stall timeout holds
        clock.now += 1
        d.alive(1)
    assert d.stalled() == []
    clock.now += 1.5
    d.alive(1)
    [stalled] = d.stalled()
    assert "inside one model batch" in stalled.reason and "no progress for 3 s" in stalled.reason


def test_actors_not_placed_in_time_are_given_up():
    clock = Clock()
    d = Dispatcher([WorkUnit("a")], placement_timeout=300, clock=clock)
    d.requested(0)
    clock.now += 299
    assert d.unplaced() == []
    clock.now += 2
    assert d.unplaced() == [0]
    d.lost(0, "not placed")
    assert d.live() == 0 and d.wants_actors() == 1


def test_an_unplaced_actor_shrinks_the_pool_and_the_last_one_ends_the_job():
    clock = Clock()
    d = Dispatcher([WorkUnit("a"), WorkUnit("b"), WorkUnit("c")], placement_timeout=300, clock=clock, target=2,
                   needs="{'num_gpus': 1}")
    assert d.to_request() == 2
    d.requested(0)
    d.requested(1)
    d.placed(1)
    d.loaded(1)
    clock.now += 301
    assert d.give_up_unplaced() == [0]  # the cluster has no room for it: asking again would wait as long
    assert d.target == 1 and d.to_request() == 0  # one actor left, and the pool is its size
    d.requested(2)  # e.g. the last actor, replaced after a death, is not placed either
    d.actors.pop(1)
    clock.now += 301
    with pytest.raises(ClusterFailed, match=r"no actor could be placed .* \(each needs \{'num_gpus': 1\}\)"):
        d.give_up_unplaced()


def test_a_dead_actor_is_replaced_while_work_is_left_and_none_when_stopped():
    d = Dispatcher([WorkUnit("a"), WorkUnit("b")], target=1)
    assert d.to_request() == 1  # none requested yet: the first request is the pool
    d.requested(0)
    d.placed(0)
    d.loaded(0)
    d.next(0)
    d.died(0, "actor died: its process exited")
    assert d.to_request() == 1  # its unit is queued again: a fresh actor
    d.stop("the lease was lost")
    assert d.to_request() == 0


def test_a_failed_load_fails_the_job_and_a_changed_model_stops_it():
    d = Dispatcher([WorkUnit("a")], target=2)
    for a in (0, 1):
        d.requested(a)
        d.placed(a)
    d.load_ended(0, UnitResult(True))
    assert d.idle() == [0]
    with pytest.raises(JobFailed, match="could not load the model: no such file"):
        d.load_ended(1, UnitResult(False, error="no such file"))
    d = Dispatcher([WorkUnit("a")], target=1)
    d.requested(0)
    d.placed(0)
    changed = UnitResult(False, error="the model changed", fatal=Fatal.MODEL_CHANGED)
    d.load_ended(0, changed)
    assert d.stopped == "the model changed" and d.fatal is changed


def test_actors_dying_before_they_take_work_fail_the_job_at_max_attempts_per_actor():
    d = Dispatcher([WorkUnit("a")], max_attempts=2, target=2)
    number = 0
    for death in range(3):  # 2 attempts x 2 actors: the fourth death ends the job
        d.requested(number)
        assert d.died(number, "actor died: its process exited") == []
        number += 1
    d.requested(number)
    d.placed(number)  # loading the model counts too
    with pytest.raises(JobFailed, match="could not load the model: actor died"):
        d.died(number, "actor died: its process exited")
    # one that died while busy is a unit's attempt, not a start-up failure
    d, _ = with_actors([WorkUnit("a")], n=1, max_attempts=1, target=1)
    d.next(0)
    [failure] = d.died(0, "actor died: out of memory")
    assert failure.attempts == 1 and d.start_failures == 0


def test_a_unit_of_a_lost_actor_counts_an_attempt_and_fails_at_the_limit():
    d, _ = with_actors([WorkUnit("a")], n=1, max_attempts=2)
    d.next(0)
    assert d.lost(0, "actor died: out of memory") == []
    d.requested(1)
    d.placed(1)
    d.loaded(1)
    d.next(1)
    [failure] = d.lost(1, "actor died: out of memory")
    assert failure.attempts == 2 and "out of memory" in failure.reason


def test_after_stop_no_unit_is_handed_out_and_the_job_ends_when_the_busy_ones_return():
    d, _ = with_actors([WorkUnit("a"), WorkUnit("b")], n=1)
    d.next(0)
    d.stop("lease lost")
    assert not d.finished
    assert d.record(0, ok()) == []
    assert d.finished and d.wants_actors() == 0


def test_units_added_at_the_end_are_done_again():
    d, _ = with_actors([WorkUnit("a")], n=1)
    d.next(0)
    d.record(0, ok())
    assert d.finished
    d.add([WorkUnit("a")])
    assert not d.finished and d.next(0).shard == "a"


def test_twenty_thousand_units_through_64_actors_commit_once_each():
    units = 20_000
    d, _ = with_actors([WorkUnit(f"s{i}") for i in range(units)], n=64)
    done = 0
    while not d.finished:
        for actor in d.idle():
            d.next(actor)
        for actor in range(64):
            if d.actors[actor].work is not None:
                done += len(d.record(actor, ok()))
    assert done == units and not d.queue


# -- backups of stragglers --------------------------------------------------------------------------------------

def straggling(n_units=4, **kwargs):
    """Two actors, units of equal work; actor 1 is slow on the last unit: actor 0 finished the rest in 10 s each."""
    units = [WorkUnit(f"s{i}", rows=100, work=1000) for i in range(n_units)]
    d, clock = with_actors(units, n=2, backup_tasks=True, **kwargs)
    d.next(1)  # s0 on the slow actor
    for _ in range(n_units - 1):
        d.next(0)
        clock.now += 10
        d.record(0, ok(100))
    return d, clock


def test_a_straggler_is_backed_up_once_the_queue_is_empty_and_the_first_to_finish_is_kept():
    d, clock = straggling()
    assert not d.queue and d.rates.median == 10 / 1000
    d.heartbeat(1, rows=20)  # 30 s in, a fifth done: 120 s left by its own rate, 10 s for a fresh attempt
    backup = d.next(0)
    assert backup is not None and backup.key == "s0" and d.actors[0].backup
    assert d.backups["started"] == 1 and "backup attempt" in d.notes[-1]
    clock.now += 10
    commit, cancel = d.record(0, ok(100, "backup-file"))
    assert isinstance(commit, Commit) and commit.shard == "s0" and commit.temp == "backup-file"
    assert cancel.actor == 1 and cancel.token == d.actors[1].token and cancel.key == ("s0", 0, 1)
    assert d.finished  # the cancelled twin is not waited for
    # whatever the twin still returns is nobody's: its file is discarded, nothing is committed twice
    [discard] = d.record(1, ok(100, "slow-file"))
    assert discard.temp == "slow-file" and d.backups["won"] == 1
    assert d.next(1) is None  # nothing left: the pool ends the run


def test_no_backup_for_a_unit_on_time_or_nearly_done_or_off():
    d, clock = straggling()
    clock.now -= 20  # s0 has run 10 s: its peers' pace
    assert d.next(0) is None
    clock.now += 20
    d.heartbeat(1, rows=95)  # 30 s in, 95% done: 1.6 s left, less than a fresh 10 s attempt
    assert d.next(0) is None
    units = [WorkUnit(f"s{i}", rows=100, work=1000) for i in range(2)]
    d2, clock2 = with_actors(units, n=2)  # backups off (the default on one machine)
    d2.next(1)
    d2.next(0)
    clock2.now += 10
    d2.record(0, ok(100))
    clock2.now += 1000
    assert d2.next(0) is None


def test_a_unit_gets_one_backup_and_the_original_can_still_win():
    d, clock = straggling()
    token = d.actors[1].token
    assert d.next(0).key == "s0"
    d.record(0, UnitResult(False, error="backup failed"))  # the backup fails: the original goes on
    assert d.next(0) is None  # no second backup
    clock.now += 5
    [commit] = d.record(1, ok(100, "slow-file"))
    assert commit.temp == "slow-file" and token and d.finished


def test_both_attempts_failing_is_one_retry_of_the_unit():
    d, clock = straggling(max_attempts=3)
    d.next(0)
    assert d.record(0, UnitResult(False, error="boom")) == [] and not d.queue
    assert d.lost(1, "actor died") == [] and [u.key for u in d.queue] == ["s0"]
    assert d.attempts[("s0", 0, 1)] == 2


def test_a_redone_unit_can_be_recorded_again():
    d, clock = straggling()
    d.next(0)
    d.record(0, ok(100))
    d.add([WorkUnit("s0", rows=100, work=1000)])  # its output was gone at the end: redone
    assert not d.finished
    [discard] = d.record(1, ok(100, "old-twin"))  # the old twin's late result is nobody's
    assert discard.temp == "old-twin" and [u.key for u in d.queue] == ["s0"]
    d.next(0)
    [commit] = d.record(0, ok(100, "again"))
    assert commit.temp == "again" and d.finished


def test_the_running_median_is_the_median():
    import random
    import statistics

    from jobs.execution.dispatcher import RunningMedian

    rng, m, values = random.Random(3), RunningMedian(), []
    for _ in range(501):
        values.append(rng.lognormvariate(0, 1))
        m.add(values[-1])
        assert m.median == statistics.median(values)


def test_shard_names_holding_the_key_separator_are_their_own_units():
    """'#' joins a shard and its part in names people read; the dispatcher never parses it back."""
    named = [WorkUnit("a#1.parquet", rows=10), WorkUnit("x.parquet", part=0, parts=2, rows=5),
             WorkUnit("x.parquet", part=1, parts=2, rows=5), WorkUnit("x.parquet#0", rows=10)]
    d, _ = with_actors(named, n=1)
    done = []
    while not d.finished:
        task = d.next(0)
        done += d.record(0, ok(10, f"t-{task.key}"))
    assert sorted(c.shard for c in done if isinstance(c, Commit)) == ["a#1.parquet", "x.parquet", "x.parquet#0"]
    # a committed output gone at the end: the shard with '#' in its name is redone, not taken as done
    d.add([WorkUnit("a#1.parquet", rows=10)])
    assert not d.finished
    task = d.next(0)
    [commit] = d.record(0, ok(10, "again"))
    assert isinstance(commit, Commit) and task.shard == "a#1.parquet" and commit.temp == "again" and d.finished


def test_a_death_is_called_out_of_memory_only_when_ray_says_so():
    from jobs.execution.pool import describe_death

    # what Ray 2.60 says of an actor whose process got SIGKILL from anyone (copied from a real run)
    killed = ("The actor died unexpectedly before finishing this task.\n\tclass_name: UnitWorker\n\tpid: 3024\n"
              "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
              "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
              "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop "
              "--force was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected "
              "error. If the process was killed by the kernel OOM killer (verifiable by checking for OOM in dmesg "
              "of the OOMing node), consider enabling resource isolation")
    said = describe_death(RuntimeError(killed))
    assert said.startswith("actor died: its process exited unexpectedly") and "out of memory" not in said
    monitor = "Task was killed due to the node running low on memory.\nMemory on the node was 23.1GB / 24GB"
    assert "out of memory" in describe_death(RuntimeError(monitor))
