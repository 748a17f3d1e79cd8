"""`persimmon-batch submit` against a real Ray head (dashboard on loopback, token authentication)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.jobs.conftest import RayCluster, free_port
from tests.jobs.test_jobfile import good, partition

BIN = Path(sys.executable).parent


def test_submit_runs_once_per_date(demo_root, tmp_path):
    day = "2026-11-20"
    partition(tmp_path, demo_root, day)
    job = tmp_path / "nightly.toml"
    job.write_text(good(demo_root / "model", tmp_path))
    dashboard = free_port()
    # the cluster's processes find persimmon-batch on their PATH, as on a cluster with the package installed
    cluster = RayCluster(env={"PATH": f"{BIN}:{os.environ['PATH']}"})
    client_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    submit = [str(BIN / "persimmon-batch"), "submit", str(job), "--address", f"http://127.0.0.1:{dashboard}",
              "--date", day]
    try:
        cluster.start_head("--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                           "--num-cpus=2")
        deadline = time.time() + 90
        while True:  # the job service comes up shortly after `ray start` returns
            first = subprocess.run([*submit, "--wait"], capture_output=True, text=True, timeout=400, env=client_env)
            if first.returncode != 2 or time.time() > deadline:
                break
            time.sleep(3)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert f"submitted nightly-{day}" in first.stdout and "shards: 2 done" in first.stdout
        assert pq.read_table(tmp_path / "out" / f"dt={day}").num_rows == 120
        second = subprocess.run(submit, capture_output=True, text=True, timeout=120, env=client_env)
        assert second.returncode == 1 and "was already submitted" in second.stderr, second.stderr[-2000:]
        # a client without the cluster's token: one line saying what to do, not Ray's AuthenticationError
        home = tmp_path / "home"
        home.mkdir()
        tokenless = {**{k: v for k, v in client_env.items() if not k.startswith("RAY_AUTH_TOKEN")},
                     "HOME": str(home), "RAY_AUTH_MODE": "token"}
        refused = subprocess.run([*submit, "--date", "2026-11-21"], capture_output=True, text=True, timeout=120,
                                 env=tokenless)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "RAY_AUTH_TOKEN" in errors[0]
    finally:
        cluster.stop()
