"""The output lease on a local filesystem: one holder, refusal naming it, takeover of a stale one (process
gone, heartbeat stopped), one winner when several runs race for a stale lease, a holder that learns it lost."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.lease import LEASE_DIR, Holder, OutputBusy, OutputLease, _process_start


def lease_for(out: Path, ttl: float = 60.0, **holder) -> OutputLease:
    return OutputLease(pafs.LocalFileSystem(), str(out), str(out), ttl=ttl,
                       holder=Holder(**holder) if holder else None)


def age(out: Path, seconds: float) -> None:
    """Make every lease file look `seconds` old (its holder stopped beating that long ago)."""
    for file in (out / LEASE_DIR).iterdir():
        then = time.time() - seconds
        os.utime(file, (then, then))


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


def test_a_holder_elsewhere_is_taken_over_only_after_its_ttl(tmp_path):
    remote = lease_for(tmp_path, ttl=30, host="other-host", machine="other-host|boot|pid:[1]")
    remote.acquire()
    age(tmp_path, 10)
    with pytest.raises(OutputBusy, match="host other-host.* last heartbeat 10 s ago.*stale after 30 s"):
        lease_for(tmp_path).acquire()
    age(tmp_path, 45)
    note = lease_for(tmp_path).acquire()
    assert "no heartbeat for 45 s, over its 30 s TTL (host other-host" in note
    # the old holder learns at its next heartbeat that it no longer owns the output
    remote.heartbeat()
    assert remote.lost and "took the output over" in remote.lost


def test_runs_racing_for_a_stale_lease_have_one_winner(tmp_path):
    lease_for(tmp_path, host="gone", machine="gone|x|y", ttl=5).acquire()
    age(tmp_path, 60)
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
