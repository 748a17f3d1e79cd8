"""Keeping every actor busy, through the real CLI on real Ray: one file cut into units for two actors and merged
back row for row, torch threads that follow the actors started, and a straggler (an actor throttled by
SIGSTOP/SIGCONT, as a slow or throttled node is) backed up on an idle actor and committed once."""

from __future__ import annotations

import os
import signal
import subprocess
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


def straggle(model: Path, path: Path, out: Path) -> tuple[subprocess.Popen, str, str] | None:
    """Run the job and throttle the second actor to read the file, from its unit's start; None when one actor
    did both units (the other was still loading the model when the queue emptied: nothing to back up)."""
    proc = cli(*classify(model, path.parent, out, "--actors", "2", "--batch-rows", "120", "--backup-tasks"))
    deadline, seen, throttle = time.time() + 180, set(), None
    try:
        while proc.poll() is None and throttle is None:  # the first reader runs its unit at full speed: it
            assert time.time() < deadline, "no second actor read the file in 180 s"  # sets the median to beat
            for pid in descendants(proc.pid):
                if pid not in seen and "ray::UnitWorker" in process_title(pid) and str(path) in open_files(pid):
                    if seen:  # throttled from its unit's start: it will be far behind when the first finishes
                        throttle = Throttle(pid)
                        throttle.start()
                        break
                    seen.add(pid)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if throttle is not None:
            throttle.stop()
        if proc.poll() is None:  # failed mid-run: end the run this test started (SIGTERM: the CLI ends its Ray)
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    return None if throttle is None else (proc, stdout, stderr)


def test_a_straggler_is_backed_up_on_an_idle_actor_and_committed_once(demo, full_size_model, tmp_path):
    _, input, _ = demo
    model = full_size_model  # its units take long enough to be throttled while they run
    path = one_file(input, tmp_path / "one", rows_per_group=120)
    # two units of 120 rows (a unit is never under --batch-rows rows), one per actor: on a loaded machine one
    # actor can finish both before the other has loaded the model; the job is then run again, into a new folder
    for attempt in range(3):
        out = tmp_path / f"out-{attempt}"
        if (ran := straggle(model, path, out)) is not None:
            break
        assert manifest_of(out)["summary"]["backups"] == {"started": 0, "won": 0}
    else:
        raise AssertionError("in 3 runs one actor always did both units: the second never read the file")
    proc, stdout, stderr = ran
    assert "a backup attempt started on an idle actor" in stdout + stderr  # said when it starts
    assert "backups: 1 started for units far behind their peers, 1 finished first" in stdout
    manifest = manifest_of(out)
    assert manifest["summary"]["backups"] == {"started": 1, "won": 1}
    got, want = pq.read_table(out / "events.parquet"), in_process_labels(model, path)
    assert got.column("id").to_pylist() == want.column("id").to_pylist()  # committed once: each row once
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert not list(out.glob("_temporary/**/*.parquet"))  # the losing attempt left nothing behind
