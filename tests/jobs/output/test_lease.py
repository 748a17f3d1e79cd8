"""The output lease on a local filesystem: one holder, refusal naming it, takeover of a stale one (process
gone, heartbeat unchanged for its TTL on the observer's clock), one winner when several runs race for a stale
lease, a holder that learns it lost."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.output.lease import LEASE_DIR, Holder, Observations, OutputBusy, OutputLease, _process_start


def lease_for(out: Path, ttl: float = 60.0, **holder) -> OutputLease:
    return OutputLease(pafs.LocalFileSystem(), str(out), str(out), ttl=ttl,
                       holder=Holder(**holder) if holder else None, observations=Observations(out.parent / "seen"))


def test_one_holder_and_the_refusal_names_it(tmp_path):
    first = lease_for(tmp_path)
    assert first.acquire() is None and first.atomic
    with pytest.raises(OutputBusy, match=f"in use by another run \\(host .*, pid {os.getpid()}, run {first.holder.run_id}"):
        lease_for(tmp_path).acquire()
    first.release()
    second = lease_for(tmp_path)
    assert second.acquire() is None  # a released lease is free, and no takeover note
    assert second.generation == 2 and [p.name for p in (tmp_path / LEASE_DIR).iterdir()] == ["000000000002.json"]


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    dead = lease_for(tmp_path, pid=child.pid, process_start=_process_start(child.pid))
    dead.acquire()
    with pytest.raises(OutputBusy):  # alive: refused
        lease_for(tmp_path).acquire()
    child.kill()
    child.wait()
    note = lease_for(tmp_path).acquire()
    assert note.startswith("took the output over from an earlier run: its process is gone") and str(child.pid) in note


def test_a_holder_elsewhere_is_judged_on_the_observers_clock(tmp_path):
    """Another machine's holder: its timestamps are never compared; its record must be seen unchanged for its
    TTL on this machine's clock. A record whose file looks a year old but keeps changing is alive."""
    remote = lease_for(tmp_path, ttl=2, host="other-host", machine="other-host|boot|pid:[1]")
    remote.acquire()
    for file in (tmp_path / LEASE_DIR).iterdir():
        os.utime(file, (1.0, 1.0))  # a clock far behind: the file looks 56 years old
    stop = threading.Event()

    def beat():
        while not stop.wait(0.3):
            remote.heartbeat()

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        started = time.monotonic()
        with pytest.raises(OutputBusy, match="host other-host.*whose heartbeat changed while this run watched"):
            lease_for(tmp_path).acquire()
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        beating.join()
    started = time.monotonic()
    note = lease_for(tmp_path).acquire()  # it stopped beating: unchanged for its 2 s TTL, watched here
    assert time.monotonic() - started >= 1.9
    assert "stayed unchanged for 2 s, over its 2 s TTL" in note and "host other-host" in note
    remote.heartbeat()  # the old holder learns at its next heartbeat that it no longer owns the output
    assert remote.lost and "took the output over" in remote.lost


def test_what_was_seen_adds_up_across_runs_and_a_stated_ttl_is_bounded(tmp_path):
    remote = lease_for(tmp_path, ttl=3, host="other-host", machine="other-host|boot|pid:[1]")
    remote.acquire()
    with pytest.raises(OutputBusy, match="unchanged for 1 s so far; the lease goes stale after 3 s"):
        lease_for(tmp_path).acquire(wait=1)
    time.sleep(1.2)
    with pytest.raises(OutputBusy, match="unchanged for 2 s so far"):
        lease_for(tmp_path).acquire(wait=0)  # no watching: the earlier look counts
    time.sleep(1.0)
    assert "over its 3 s TTL" in lease_for(tmp_path).acquire(wait=0)

    other = tmp_path / "other"
    huge = lease_for(other, ttl=3, host="x", machine="x|y|z")
    huge.holder.ttl = 1e12  # what a record may claim
    huge.acquire()
    with pytest.raises(OutputBusy, match="stale after 3600 s"):
        lease_for(other).acquire(wait=0)


def test_runs_racing_for_a_stale_lease_have_one_winner(tmp_path):
    lease_for(tmp_path, host="gone", machine="gone|x|y", ttl=1).acquire()
    winners, busy = [], []
    start = threading.Barrier(8)

    def contend():
        lease = lease_for(tmp_path)
        start.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except OutputBusy:
            busy.append(lease)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(busy) == 7


def test_the_heartbeat_keeps_a_live_lease_fresh(tmp_path):
    lease = lease_for(tmp_path, ttl=1.0)
    lease.acquire()
    lease.start_heartbeat()
    time.sleep(2.5)  # 10 heartbeat periods, over twice the TTL
    with pytest.raises(OutputBusy):
        lease_for(tmp_path).acquire()
    lease.release()
    assert lease.lost is None
    assert lease_for(tmp_path).acquire() is None


def test_a_folder_put_in_place_of_the_output_is_not_mistaken_for_ours(tmp_path):
    """The output folder removed and made again by another run, whose lease has the same generation number:
    the first run learns at its next heartbeat that the lease is not its own."""
    import shutil

    first = lease_for(tmp_path / "out")
    first.acquire()
    shutil.rmtree(tmp_path / "out")
    second = lease_for(tmp_path / "out")
    second.acquire()
    assert second.generation == first.generation == 1
    first.heartbeat()
    assert first.lost and "now belongs to another run" in first.lost and second.holder.run_id in first.lost
    with pytest.raises(OutputBusy):
        first.confirm(force=True)
    second.heartbeat()
    assert second.lost is None


def test_generations_past_twelve_digits_are_still_ours(tmp_path):
    from jobs.output.lease import LEASE_NAME

    lease = lease_for(tmp_path)
    (tmp_path / LEASE_DIR).mkdir()
    (tmp_path / LEASE_DIR / "999999999999.json").write_text('{"released": true}')
    assert lease.acquire() is None and lease.generation == 10 ** 12
    assert [LEASE_NAME.fullmatch(p.name) is not None for p in (tmp_path / LEASE_DIR).iterdir()] == [True]
