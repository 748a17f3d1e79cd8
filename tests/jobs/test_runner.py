"""The runner on real Ray (num_cpus=2) with real Parquet and safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from jobs.errors import ForeignOutput
from jobs.runner import JobConflict, run_job
from tests.jobs.conftest import TEST_SHAPE, add_shards, descendants, process_title
from jobs.output.manifest import MANIFEST, SUCCESS, Manifest, ShardEntry, check_shape
from jobs.output.commit import TEMPORARY
from jobs.output.paths import resolve
from jobs.spec import JobSpec, RunnerSettings
from pipelines import ClassificationPipeline, EmbeddingPipeline


def spec_for(model, input, output, task="classify", **runner) -> JobSpec:
    return JobSpec(task, str(model), str(input), str(output), options={"dtype": "float32"},
                   runner=RunnerSettings(**runner))


def output_table(out: Path) -> pa.Table:
    files = sorted(p for p in out.rglob("*.parquet") if not p.name.startswith("_") and TEMPORARY not in p.parts)
    return pa.concat_tables([pq.read_table(p) for p in files]).sort_by("id")


def file_digests(out: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in out.glob("*.parquet")}


def assert_exactly_once(out: Path, input: Path) -> pa.Table:
    table = output_table(out)
    ids = table.column("id").to_pylist()
    expected = sorted(i for p in input.glob("*.parquet") if p.name.startswith("part-")
                      for i in pq.read_table(p).column("id").to_pylist())
    assert ids == expected, "every input row exactly once"
    assert not list(out.glob(f"{TEMPORARY}/*")), "no temporaries left"
    return table


def test_every_row_once_with_in_process_labels(ray_local, demo):
    model, input, out = demo
    result = run_job(spec_for(model, input, out))
    assert result.ok and result.done == 4 and result.rows == 240
    table = assert_exactly_once(out, input)
    reference = ClassificationPipeline(model, dtype="float32")(
        pa.concat_tables([pq.read_table(p) for p in sorted(input.glob("*.parquet"))])).sort_by("id")
    assert table.column("label").to_pylist() == reference.column("label").to_pylist()
    np.testing.assert_allclose(np.array(table.column("probs").to_pylist()),
                               np.array(reference.column("probs").to_pylist()), atol=1e-5)
    assert table.column("text").to_pylist() == reference.column("text").to_pylist()  # passed through
    manifest = Manifest.load(*resolve(str(out))).data
    assert manifest["summary"]["done"] == 4 and (out / SUCCESS).exists()
    for entry in manifest["shards"].values():
        assert entry["state"] == "done" and entry["rows"] == 60 and entry["node"]
        assert set(entry) <= set(ShardEntry.__annotations__), "every field an entry gets is in its one schema"
    assert check_shape(manifest, "here") is manifest

    before = file_digests(out)
    again = run_job(spec_for(model, input, out))  # a rerun does nothing and changes nothing
    assert again.ok and again.skipped == 4 and again.rows == 0
    assert file_digests(out) == before


def test_sliced_shards_and_adoption_of_unrecorded_commits(ray_local, demo):
    model, input, out = demo
    result = run_job(spec_for(model, input, out, rows_per_unit=25, batch_rows=10))  # row groups of 100 -> slices
    table = assert_exactly_once(out, input)
    reference = pq.read_table(input / "part-00000.parquet").column("id").to_pylist()
    assert table.column("id").to_pylist()[:60] == reference and result.ok
    # a commit the driver never recorded (it died in between) is adopted, not recomputed
    fs, base = resolve(str(out))
    manifest = Manifest.load(fs, base)
    del manifest.shards["part-00002.parquet"]
    manifest.save()
    again = run_job(spec_for(model, input, out))
    adopted = Manifest.load(fs, base).shards["part-00002.parquet"]
    assert again.skipped == 4 and adopted["adopted"] and adopted["rows"] == 60


def test_bad_shards_fail_with_reasons_others_finish(ray_local, demo):
    model, input, out = demo
    # named to sort first: the job must not be refused because its first shard is the bad one
    (input / "a-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pa.table({"id": [1000], "body": ["wrong column"]}), input / "b-no-text.parquet")
    result = run_job(spec_for(model, input, out, max_attempts=2))
    assert not result.ok and result.done == 4 and result.failed == 2
    shards = Manifest.load(*resolve(str(out))).shards
    assert shards["a-corrupt.parquet"]["state"] == "failed" and "Parquet" in shards["a-corrupt.parquet"]["error"]
    assert "text column 'text' not in b-no-text.parquet" in shards["b-no-text.parquet"]["error"]
    assert not (out / SUCCESS).exists() and not (out / "a-corrupt.parquet").exists()
    assert len(output_table(out)) == 240
    # a text column that no shard has is a mistyped name: refused before any work
    wrong = spec_for(model, input, tmp_out := out.parent / "wrong")
    wrong.text_column = "body_text"
    with pytest.raises(ValueError, match="text column 'body_text' not in b-no-text.parquet; its columns are"):
        run_job(wrong)
    assert not tmp_out.exists()


def test_changed_options_refused_unless_overwrite(ray_local, demo):
    model, input, out = demo
    run_job(spec_for(model, input, out))
    changed = spec_for(model, input, out)
    changed.options.max_length = 16
    with pytest.raises(JobConflict, match="another model or options"):
        run_job(changed)
    changed.overwrite = True
    result = run_job(changed)
    assert result.ok and result.skipped == 0 and result.truncated > 0


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_actor_killed_mid_shard_is_redone(ray_local, demo, task):
    model, input, out = demo
    # more, slower work: 8 shards, one actor, small batches
    add_shards(input, 8)
    killed = []

    def kill_worker_soon(_shard):
        if killed:
            return

        def kill():
            time.sleep(0.3)  # the actor is inside its next shard by now
            # this test's own worker: a descendant of this process (ray.init started the raylet) with its title
            pids = [p for p in descendants(os.getpid()) if process_title(p).startswith("ray::UnitWorker")]
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            killed.extend(pids)

        killed.append("scheduled")
        threading.Thread(target=kill).start()

    result = run_job(spec_for(model, input, out, task, actors=1, batch_rows=8), on_commit=kill_worker_soon)
    assert len(killed) > 1, "a worker process was killed"
    assert result.ok and result.done == 8
    assert_exactly_once(out, input)
    attempts = [e.get("attempts", 1) for e in Manifest.load(*resolve(str(out))).shards.values()]
    assert max(attempts) == 2  # the unit in flight was redone once


def test_a_run_that_lost_its_lease_commits_nothing_more(ray_local, demo):
    """Another run took the output over (as it would after this run's heartbeat stalled past the TTL): this
    run stops before its next commit, keeps what it committed, and says why."""
    model, input, out = demo
    add_shards(input, 8)

    def take_over(_shard):
        lease = out / "_lease"
        if len(list(lease.iterdir())) == 1:  # what a taker does: create the next generation
            newest = max(lease.iterdir())
            taker = {**json.loads(newest.read_text()), "host": "other-host", "pid": 4242, "run_id": "taker"}
            (lease / f"{int(newest.stem) + 1:012d}.json").write_text(json.dumps(taker))
            time.sleep(1.0)  # a few heartbeats (lease_ttl 1 s: every 0.25 s)

    result = run_job(spec_for(model, input, out, actors=1, batch_rows=8, lease_ttl=1.0), on_commit=take_over)
    assert result.lost and "host other-host, pid 4242, run taker" in result.lost and result.exit_code == 75
    assert 1 <= result.done < 8 and not (out / SUCCESS).exists()
    committed = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(committed) == result.done  # what it committed is kept and recorded, nothing after
    assert Manifest.load(*resolve(str(out))).counts()["done"] == result.done


def test_manifest_of_unreadable_json_is_reported(ray_local, demo):
    model, input, out = demo
    out.mkdir()
    (out / MANIFEST).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        run_job(spec_for(model, input, out))


def test_generate_job_matches_pipeline(ray_local, demo, causal_model):
    from persimmon import SamplingParams
    from pipelines import GenerationPipeline

    model, input, out = demo
    causal = causal_model
    options = {"dtype": "float32", "max_new_tokens": 6, "prompt_template": "human: {text}\n\nadept:",
               "temperature": 0.7, "seed": 5}
    result = run_job(JobSpec("generate", str(causal), str(input), str(out), options=options))
    assert result.ok and result.generated_tokens > 0
    table = output_table(out)
    assert table.schema.field("completion_tokens").type == pa.int32()
    pipe = GenerationPipeline(causal, max_new_tokens=6, prompt_template="human: {text}\n\nadept:", dtype="float32",
                              sampling=SamplingParams(temperature=0.7, seed=5))
    expected = pipe(pq.read_table(input / "part-00001.parquet"))
    got = table.filter(pa.compute.is_in(table.column("id"), expected.column("id")))
    assert got.column("completion").to_pylist() == expected.column("completion").to_pylist()


def test_embed_job_matches_pipeline_once_and_reruns_nothing(ray_local, demo, causal_model):
    _, input, out = demo
    result = run_job(spec_for(causal_model, input, out, "embed"))
    assert result.ok and result.done == 4 and result.rows == 240
    table = assert_exactly_once(out, input)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), TEST_SHAPE["hidden_size"])
    reference = EmbeddingPipeline(causal_model, dtype="float32")(
        pa.concat_tables([pq.read_table(p) for p in sorted(input.glob("*.parquet"))])).sort_by("id")
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()),
                               np.array(reference.column("embedding").to_pylist()), atol=1e-5)
    before = file_digests(out)
    again = run_job(spec_for(causal_model, input, out, "embed"))
    assert again.ok and again.skipped == 4 and file_digests(out) == before
    mean = spec_for(causal_model, input, out, "embed")
    mean.options.pooling = "mean"
    with pytest.raises(JobConflict, match="another model or options"):
        run_job(mean)


def test_progress_bar_on_a_terminal():
    import io

    from jobs.execution.progress import Progress

    stream = io.StringIO()
    progress = Progress(total_rows=100, total_shards=2, stream=stream, tty=True)
    progress.update(50)
    progress.shard_done("a.parquet", {"rows": 50, "errors": 0, "seconds": 1.0, "node": "n" * 20})
    progress.close()
    text = stream.getvalue()
    assert "\r[" in text and "50/100 rows" in text and "shards 1/2 done, 0 failed" in text and "ETA" in text


def test_a_file_of_the_users_in_the_output_is_never_replaced(ray_local, demo):
    """An output folder that already holds a file named like an output shard, written by someone else: the
    job is refused before anything is written, --overwrite included (it replaces this tool's outputs only)."""
    model, input, out = demo
    out.mkdir()
    pq.write_table(pa.table({"mine": [1, 2, 3]}), out / "part-00002.parquet")
    for overwrite in (False, True):
        spec = spec_for(model, input, out)
        spec.overwrite = overwrite
        with pytest.raises(ForeignOutput, match=r"holds files persimmon-batch did not write \(part-00002.parquet\)"):
            run_job(spec)
    assert pq.read_table(out / "part-00002.parquet").column_names == ["mine"]
    assert sorted(p.name for p in out.iterdir()) == ["part-00002.parquet"]


def test_a_process_already_on_ray_runs_there_and_refuses_another_address(ray_local, demo):
    """A notebook or a Ray job's driver is already connected: the run uses that Ray; an --address naming
    another cluster is refused before anything is written, never silently ignored."""
    from jobs.errors import UsageError

    model, input, out = demo
    with pytest.raises(UsageError, match="already connected to the Ray cluster at"):
        run_job(spec_for(model, input, out, address="127.0.0.1:9"))
    assert not out.exists()
    here = ray_local.get_runtime_context().gcs_address
    result = run_job(spec_for(model, input, out, address=here.replace("127.0.0.1", "localhost")))
    assert result.ok and result.done == 4
