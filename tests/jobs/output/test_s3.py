"""The exactly-once promises on an object store: a real S3-compatible server (moto) on 127.0.0.1, pyarrow's
S3 filesystem through `s3://...?endpoint_override=` URIs, the real CLI on real Ray.

Commit and a no-op rerun, a changed shard reprocessed, a second run refused while the first holds the lease,
the driver killed mid-run and the rerun taking over and finishing exactly once."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output.lease import OutputBusy, OutputLease
from jobs.output.paths import resolve
from tests.jobs.conftest import add_shards, classify, cli, run, run_here

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


class Store:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=f"http://{endpoint}")

    def uri(self, key: str) -> str:
        return f"s3://lake/{key}?endpoint_override={self.endpoint}&scheme=http"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))

    def put_table(self, key: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.client.put_object(Bucket="lake", Key=key, Body=sink.getvalue())

    def table(self, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.client.get_object(Bucket="lake", Key=key)["Body"].read()))

    def ids(self, prefix: str) -> list[int]:
        return sorted(i for k in self.keys(prefix) if k.endswith(".parquet") and not k.startswith("_")
                      for i in self.table(prefix + k).column("id").to_pylist())

    def upload(self, folder, prefix: str) -> None:
        for path in sorted(folder.glob("*.parquet")):
            self.client.upload_file(str(path), "lake", prefix + path.name)


@pytest.fixture(scope="module")
def store():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # for this process, the CLI processes it starts and their Ray workers
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = Store(f"{host}:{port}")
    s3.client.create_bucket(Bucket="lake")
    yield s3
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_commit_rerun_and_changed_shard_on_s3(store, ray_local, demo, tiny_classifier):  # store first: Ray's
    # workers start with the store's credentials in their environment
    _, input, _ = demo
    model = tiny_classifier
    store.upload(input, "a/input/")
    args = classify(model, store.uri("a/input/"), store.uri("a/out/"))
    first = run_here(*args)
    assert first.returncode == 0, first.stderr
    assert store.ids("a/out/") == store.ids("a/input/")
    keys = store.keys("a/out/")
    assert "_SUCCESS" in keys and "_manifest.json" in keys
    assert not [k for k in keys if k.startswith(("_temporary", "_journal"))], keys
    manifest = json.loads(store.client.get_object(Bucket="lake", Key="a/out/_manifest.json")["Body"].read())
    assert manifest["summary"]["done"] == 4
    before = {k: store.client.head_object(Bucket="lake", Key="a/out/" + k)["ETag"] for k in keys if k.endswith(".parquet")}

    again = run_here(*args)
    assert again.returncode == 0 and "4 done (4 already committed)" in again.stdout, again.stderr
    assert {k: store.client.head_object(Bucket="lake", Key="a/out/" + k)["ETag"] for k in before} == before

    grown = store.table("a/input/part-00002.parquet")
    extra = grown.slice(0, 3).set_column(0, "id", pa.array([7000, 7001, 7002], pa.int64()))
    time.sleep(1.1)  # S3 modification times have one-second resolution
    store.put_table("a/input/part-00002.parquet", pa.concat_tables([grown, extra]))
    changed = run_here(*args)
    assert changed.returncode == 0, changed.stderr
    assert "part-00002.parquet changed since its output was committed: reprocessed" in changed.stdout
    assert store.ids("a/out/") == store.ids("a/input/")


def test_one_owner_and_a_killed_driver_on_s3(store, ray_local, demo):
    model, input, _ = demo
    add_shards(input, 10)
    store.upload(input, "b/input/")
    args = classify(model, store.uri("b/input/"), store.uri("b/out/"), "--batch-rows", "8")
    first = cli(*args, start_new_session=True)
    deadline = time.time() + 240
    while not [k for k in store.keys("b/out/") if k.startswith("part-")]:
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = run(*args, timeout=120)
    assert second.returncode == 75 and f"pid {first.pid}" in second.stderr, second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    first.wait()
    assert "_SUCCESS" not in store.keys("b/out/")
    rerun = run_here(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "took the output over from an earlier run: its process is gone" in rerun.stdout
    assert store.ids("b/out/") == store.ids("b/input/")
    keys = store.keys("b/out/")
    assert "_SUCCESS" in keys and not [k for k in keys if k.startswith(("_temporary", "_journal"))], keys


def test_the_lease_without_conditional_writes_is_best_effort_but_works(store):
    """Where boto3 is missing, the lease is written, left to settle and read back."""
    fs, base = resolve(store.uri("c/out"))
    first = OutputLease(fs, base, store.uri("c/out"))
    first.creator.s3 = None  # as without boto3
    assert not first.atomic and first.acquire() is None
    second = OutputLease(fs, base, store.uri("c/out"))
    assert second.atomic
    with pytest.raises(OutputBusy, match="in use by another run"):
        second.acquire()
    first.release()
    assert second.acquire() is None
