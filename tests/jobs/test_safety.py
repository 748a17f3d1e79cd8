"""The exactly-once promise where users break it: big shards, overlapping runs, changed inputs, the same job
from the CLI and a job file, an output inside the input, bad shards, a dying progress actor, corrupt weights,
SIGTERM. Each test performs the user's action through the real CLI on real Ray and real Parquet."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.output.manifest import SUCCESS
from jobs.output.commit import TEMPORARY
from tests.jobs.conftest import (add_shards, classify, cli, descendants, ids_of, manifest_of, process_title, run,
                                 run_here, wait_for_commits)

runner = CliRunner()


def test_a_shard_over_the_slicing_threshold_is_sliced_merged_and_rerun(ray_local, tiny_classifier, tmp_path):
    """250,000 rows in 3 row groups: over the 200,000-row threshold, so it is split into row-group slices
    processed as separate units and concatenated into one output file, in input order."""
    from pipelines import ClassificationPipeline

    n = 250_000
    input, out = tmp_path / "big", tmp_path / "out"
    input.mkdir()
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"row {i}" for i in range(n)]})
    pq.write_table(table, input / "events.parquet", row_group_size=100_000)
    assert pq.ParquetFile(input / "events.parquet").metadata.num_row_groups == 3
    args = classify(tiny_classifier, input, out, "--dtype", "float32")
    first = run_here(*args)
    assert first.returncode == 0, first.stderr
    entry = manifest_of(out)["shards"]["events.parquet"]
    assert entry["state"] == "done" and entry["parts"] == 2 and entry["rows"] == n  # it was sliced
    result = pq.read_table(out / "events.parquet")
    assert result.column("id").to_pylist() == list(range(n))  # every row once, in input order
    reference = ClassificationPipeline(tiny_classifier, dtype="float32")
    for start in (0, 149_990, n - 10):  # each slice, and across the slice boundary
        expected = reference(table.slice(start, 10))
        assert result.slice(start, 10).column("label").to_pylist() == expected.column("label").to_pylist()
    again = run_here(*args)
    assert again.returncode == 0, again.stderr
    assert "1 done (1 already committed)" in again.stdout


def test_overlapping_runs_have_one_owner(ray_local, demo):
    """A nightly trigger overlapping a manual run: the second is refused, naming the first; the first
    finishes with every row once."""
    model, input, out = demo
    add_shards(input, 12)
    args = classify(model, input, out, "--batch-rows", "8")
    first = cli(*args)
    wait_for_commits(out, first)
    second = run(*args, timeout=120)
    assert second.returncode == 75, second.stderr
    status = runner.invoke(app, ["status", str(out)])
    assert first.poll() is None, "the first run is still running"
    assert f"running now: host {socket.gethostname()}, pid {first.pid}" in status.output
    assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert ids_of(out) == ids_of(input)
    assert (out / SUCCESS).exists() and not (out / TEMPORARY).exists()
    third = run_here(*args)  # the lease was given back: the next run owns the output and has nothing to do
    assert third.returncode == 0 and "12 done (12 already committed)" in third.stdout, third.stderr


def test_changed_input_is_reprocessed_and_removed_input_reported(ray_local, demo, tiny_classifier):
    _, input, out = demo
    model = tiny_classifier
    args = classify(model, input, out)
    first = run_here(*args, "--actors", "3")  # more actors than this machine's CPUs: they share them
    assert first.returncode == 0, first.stderr
    # part-00001 grows by 5 rows, part-00003 disappears
    grown = pq.read_table(input / "part-00001.parquet")
    extra = grown.slice(0, 5).set_column(0, "id", pa.array([9000 + i for i in range(5)], pa.int64()))
    pq.write_table(pa.concat_tables([grown, extra]), input / "part-00001.parquet")
    (input / "part-00003.parquet").unlink()
    untouched = (out / "part-00000.parquet").stat().st_mtime_ns
    rerun = run_here(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "part-00001.parquet changed since its output was committed: reprocessed" in rerun.stdout
    assert "part-00003.parquet is no longer in the input; its output is kept (--overwrite removes it)" in rerun.stdout
    assert ids_of(out, "part-00001.parquet") == ids_of(input, "part-00001.parquet")  # the 5 new rows are there
    assert (out / "part-00003.parquet").exists() and (out / SUCCESS).exists()
    assert (out / "part-00000.parquet").stat().st_mtime_ns == untouched
    for run in (rerun, run_here(*args)):  # said on every run that keeps the file, as a warning
        assert "WARNING: the output still holds 1 file(s) whose input is gone (part-00003.parquet)" in run.stderr
    identity = json.loads(pq.read_schema(out / "part-00001.parquet").metadata[b"persimmon_batch.input_identity"])
    assert identity["rows"] == 65 and identity["size"] == (input / "part-00001.parquet").stat().st_size
    assert manifest_of(out)["shards"]["part-00001.parquet"]["input_identity"] == identity
    cleanup = run_here(*args, "--overwrite")
    assert cleanup.returncode == 0, cleanup.stderr
    assert not (out / "part-00003.parquet").exists() and "removed the output of part-00003.parquet" in cleanup.stdout
    assert ids_of(out) == ids_of(input)


def test_same_job_from_the_cli_and_a_job_file_is_one_job(ray_local, demo, tiny_classifier, tmp_path):
    """Defaults written out by the CLI and omitted by a job file, or options that cannot change the output,
    do not make a different job. Also: an input directory whose name has glob characters, files that
    discovery skips are counted, and a rerun with nothing to do leaves no _temporary/ behind."""
    _, demo_input, out = demo
    model = tiny_classifier
    input = tmp_path / "tickets[1]"
    shutil.copytree(demo_input, input)
    (input / "README.txt").write_text("not data")
    (input / "_scratch.parquet").write_bytes(b"ignored")
    (input / ".hidden.parquet").write_bytes(b"ignored")
    first = run_here(*classify(model, input, out))
    assert first.returncode == 0, first.stderr
    assert "3 files or folders skipped (hidden, _-prefixed, not .parquet, .csv or .jsonl or not regular files): " in first.stdout
    skipped = next(line for line in first.stdout.splitlines() if "files or folders skipped" in line)
    assert all(name in skipped for name in ("README.txt", "_scratch.parquet", ".hidden.parquet"))  # named
    job = tmp_path / "job.toml"  # input and output relative to the job file's folder, run from elsewhere
    job.write_text(f'name = "triage"\ntask = "classify"\nmodel = "{model}"\ninput = "{input.name}"\n'
                   f'output = "{out.name}"\n')
    from_file = run_here("run", job, cwd="/")
    assert from_file.returncode == 0, from_file.stderr
    assert "4 done (4 already committed)" in from_file.stdout
    assert not (out / TEMPORARY).exists()
    tuned = run_here(*classify(model, input, out, "--batch-tokens", "512", "--batch-rows", "7", "--actors", "1",
                          "--dtype", "float32",  # the demo checkpoint is float32: auto is float32
                          "--max-length", "1024", "--threshold", "0.7"))  # the window; not a multi-label model
    assert tuned.returncode == 0 and "4 done (4 already committed)" in tuned.stdout, tuned.stderr
    job.write_text(job.read_text() + "\n[options]\nmax_length = 16\n")
    changed = run_here("run", job, cwd="/")
    assert changed.returncode == 2 and "another model or options" in changed.stderr


REFUSED = {  # case: (input, output, message), paths relative to the test's folder
    "same": ("input", "input", "overlaps the input: it is the input folder:"),
    "inside": ("input", "input/scored", "overlaps the input: it is inside the input folder"),
    "file-parent": ("input/part-00000.parquet", "input", "it is the folder the input's files are in"),
    "glob-base": ("input/*.parquet", "input", "it is the folder the input's files are in"),
    "output-symlink-to-input": ("input", "alias", "overlaps the input: it is the input folder:"),
    "input-symlink-output-inside": ("alias", "input/scored", "overlaps the input: it is inside the input folder"),
    "two-shards-one-output": ("input/*", "out", "would both write output"),
    "output-is-file": ("input/part-00001.parquet", "input/part-00000.parquet", "is a file, not a directory"),
    "unwritable": ("input", "/sys/persimmon-batch-out", "is a system folder"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_output_that_would_overwrite_the_input_or_cannot_be_written_is_refused(demo, case):
    model, input, out = demo
    root = input.parent
    (root / "alias").symlink_to(input, target_is_directory=True)
    shutil.copy(input / "part-00002.parquet", input / "part-00002")  # glob "*" matches it and part-00002.parquet
    source, output, message = REFUSED[case]
    before = {p.name: p.read_bytes() for p in input.iterdir()}
    result = runner.invoke(app, classify(str(model), str(root / source), str(root / output)))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    if "overlaps" in message:  # the output named once (as resolved), not again as the input or its folder
        shown = result.output.split()[2]
        assert len(re.findall(re.escape(shown) + r"(?![/\w])", result.output)) == 1, result.output
    assert {p.name: p.read_bytes() for p in input.iterdir()} == before


def test_an_output_of_a_shard_gone_from_the_input_is_reported_whatever_its_last_state(ray_local, demo, tiny_classifier):
    """Committed, then broken (failed on the rerun), then deleted: its old output is still the input's
    shadow, reported and removed only with --overwrite."""
    _, input, out = demo
    args = classify(tiny_classifier, input, out)
    assert run_here(*args).returncode == 0
    (input / "part-00001.parquet").write_bytes(b"garbage")
    broken = run_here(*args)
    assert broken.returncode == 1 and "failed: part-00001.parquet: not a Parquet file" in broken.stdout
    (input / "part-00001.parquet").unlink()
    gone = run_here(*args)
    assert gone.returncode == 0, gone.stderr
    assert "part-00001.parquet is no longer in the input; its output is kept" in gone.stdout
    status = runner.invoke(app, ["status", str(out)])
    assert "input removed: part-00001.parquet" in status.output and "\ncomplete" in status.output
    cleanup = run_here(*args, "--overwrite")
    assert cleanup.returncode == 0 and not (out / "part-00001.parquet").exists(), cleanup.stderr
    assert ids_of(out) == ids_of(input)


def test_permanent_shard_errors_are_not_retried(ray_local, demo, tiny_classifier):
    _, input, out = demo
    model = tiny_classifier
    (input / "a-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pa.table({"id": [1000], "body": ["wrong column"]}), input / "b-no-text.parquet")
    pq.write_table(pa.table({"id": [1001], "text": ["a ticket"], "label": ["mine"]}), input / "c-clash.parquet")
    result = run_here(*classify(model, input, out))
    assert result.returncode == 1, result.stderr
    shards = manifest_of(out)["shards"]
    reasons = {"a-corrupt.parquet": "not a Parquet file", "b-no-text.parquet": "text column 'text' not in b-no-text.parquet",
               "c-clash.parquet": "already has column(s) ['label']"}
    for name, reason in reasons.items():
        assert shards[name]["state"] == "failed" and reason in shards[name]["error"], shards[name]
        assert shards[name]["attempts"] == 0, "found before any model ran, not retried"
        assert f"failed: {name}" in result.stdout
    assert sum(s["state"] == "done" for s in shards.values()) == 4
    assert ids_of(out) == ids_of(input, "part-*.parquet") and not (out / SUCCESS).exists()


def test_corrupt_weights_give_error_rows_and_any_weight_change_is_a_new_model(ray_local, demo, full_size_model,
                                                                            tmp_path):
    from safetensors.torch import load_file, save_file

    _, input, out = demo
    broken = tmp_path / "broken"
    shutil.copytree(full_size_model, broken)  # a weight file over 4 MiB, for the part below
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_here(*classify(broken, input, out))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out / "part-00000.parquet")
    assert set(table.column("error").to_pylist()) == {"model produced non-finite scores"}
    assert table.column("label").null_count == table.num_rows
    assert "WARNING: 240 of 240 rows got non-finite scores from the model" in result.stderr

    # a change deep inside a weight file (not in its first or last MiB) is another model
    path = broken / "model.safetensors"
    size = path.stat().st_size
    assert size > 4 << 20
    with open(path, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    assert load_file(path)  # still a loadable checkpoint
    changed = run_here(*classify(broken, input, out))
    assert changed.returncode == 2 and "another model or options" in changed.stderr, changed.stdout


def test_sigterm_stops_like_ctrl_c_and_a_rerun_resumes(demo):
    model, input, out = demo
    add_shards(input, 8)
    args = classify(model, input, out, "--batch-rows", "8")
    proc = cli(*args)
    wait_for_commits(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted: rerun the same command to resume" in stdout
    assert (stdout + stderr).count("interrupted: rerun") == 1, (stdout, stderr)  # said once, in the summary
    assert not (out / SUCCESS).exists() and not (out / TEMPORARY).exists()
    # as after Ctrl-C (test_cli reruns to the end from there): the lease given back, the manifest saying
    # what is left
    assert json.loads(next((out / "_lease").iterdir()).read_text())["released"] is True
    status = runner.invoke(app, ["status", str(out)])
    assert "incomplete: rerun the job to finish it" in status.output


def test_sigterm_while_ray_starts_stops_the_whole_backfill(demo, tmp_path):
    model, input, _ = demo
    for day in ("2026-11-01", "2026-11-02"):
        shutil.copytree(input, tmp_path / "in" / day)
    job = tmp_path / "job.toml"
    job.write_text(f'name = "bf"\ntask = "classify"\nmodel = "{model}"\ninput = "in/{{date}}"\n'
                   f'output = "out/{{date}}"\n')
    proc = cli("run", job, "--from", "2026-11-01", "--to", "2026-11-02", cwd="/")  # paths: the file's folder
    deadline = time.time() + 120
    while not any("gcs_server" in process_title(pid) for pid in descendants(proc.pid)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # Ray is starting: its own SIGTERM handler may be the one installed
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (stdout, stderr)
    assert "interrupted: rerun the same command to resume" in stdout + stderr
    assert "for 2026-11-02" not in stdout and not (tmp_path / "out" / "2026-11-02").exists()
    # stopped before anything but its lease was written: the output folder it created is gone again
    assert not (tmp_path / "out" / "2026-11-01").exists()
