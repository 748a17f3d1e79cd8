"""Keeping every actor busy, through the real CLI on real Ray: one file cut into units for two actors and merged
back row for row, torch threads that follow the actors started, and a straggler (an actor throttled by
SIGSTOP/SIGCONT, as a slow or throttled node is) backed up on an idle actor and committed once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.jobs.conftest import classify, cli, descendants, manifest_of, process_title, run_here


def one_file(input: Path, folder: Path, rows_per_group: int = 60) -> Path:
    """The demo's rows in one file of several row groups (ids kept)."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(input.glob("*.parquet"))])
    folder.mkdir()
    pq.write_table(table, folder / "events.parquet", row_group_size=rows_per_group)
    return folder / "events.parquet"


def in_process_labels(model: Path, path: Path) -> pa.Table:
    from pipelines import ClassificationPipeline

    return ClassificationPipeline(model, dtype="float32")(pq.read_table(path))


def test_a_file_split_across_actors_equals_the_unsplit_output_and_threads_follow_the_actors_started(ray_local, demo,
                                                                                                  tmp_path):
    model, input, out = demo
    path = one_file(input, tmp_path / "one")  # 240 rows in 4 row groups of 60
    proc = run_here(*classify(model, path.parent, out, "--actors", "2", "--batch-rows", "16"))
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(out)
    entry, layout = manifest["shards"]["events.parquet"], manifest["layout"]
    assert layout["actors"] == 2 and layout["units"] == entry["parts"] == 6  # 40 rows each: cuts inside groups
    assert "layout: 2 actors" in proc.stdout
    got, want = pq.read_table(out / "events.parquet"), in_process_labels(model, path)
    assert got.column("id").to_pylist() == want.column("id").to_pylist()  # every row once, in order
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert np.allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-5)
    # two actors asked for, one unit of work (a small file): one actor starts, with the CPUs of both
    small = tmp_path / "small"
    small.mkdir()
    pq.write_table(pq.read_table(input / "part-00000.parquet"), small / "part-00000.parquet")
    proc = run_here(*classify(model, small, tmp_path / "small-out", "--actors", "2"))
    assert proc.returncode == 0, proc.stderr
    alone = manifest_of(tmp_path / "small-out")
    assert alone["layout"]["actors"] == 1 and alone["layout"]["requested"] == 2
    assert alone["layout"]["threads_per_actor"] == 2 * layout["threads_per_actor"]
    assert alone["shards"]["part-00000.parquet"]["threads"] == alone["layout"]["threads_per_actor"]
    assert entry["threads"] == layout["threads_per_actor"]  # what torch in the actor really ran with


def open_files(pid: int) -> set[str]:
    try:
        return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return set()


class Throttle(threading.Thread):
    """Run a process 10% of the time (0.1 s on, 0.9 s stopped), as a throttled cloud node runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self.done.wait(0.9)
                os.kill(self.pid, signal.SIGCONT)
                self.done.wait(0.1)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_straggler_is_backed_up_on_an_idle_actor_and_committed_once(demo, full_size_model, tmp_path):
    _, input, out = demo
    model = full_size_model  # its units take long enough to be throttled while they run
    path = one_file(input, tmp_path / "one", rows_per_group=120)
    # two units of 120 rows (a unit is never under --batch-rows rows), one per actor
    proc = cli(*classify(model, path.parent, out, "--actors", "2", "--batch-rows", "120", "--backup-tasks"))
    deadline, reader = time.time() + 120, None
    while time.time() < deadline:  # the first actor to read its unit is throttled from its unit's start: one
        assert proc.poll() is None, proc.communicate()  # throttled late in its unit has little left to back up
        workers = [p for p in descendants(proc.pid) if "ray::UnitWorker" in process_title(p)]
        reader = next((p for p in workers if str(path) in open_files(p)), None)
        if reader is not None:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("no actor ever read the file")
    throttle = Throttle(reader)
    throttle.start()
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        throttle.stop()
    assert proc.returncode == 0, stderr
    assert "a backup attempt started on an idle actor" in stdout + stderr  # said when it starts
    assert "backups: 1 started for units far behind their peers, 1 finished first" in stdout
    manifest = manifest_of(out)
    assert manifest["summary"]["backups"] == {"started": 1, "won": 1}
    got, want = pq.read_table(out / "events.parquet"), in_process_labels(model, path)
    assert got.column("id").to_pylist() == want.column("id").to_pylist()  # committed once: each row once
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert not list(out.glob("_temporary/**/*.parquet"))  # the losing attempt left nothing behind
