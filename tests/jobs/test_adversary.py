"""What an adversary did to a run, through the real CLI on real Ray and real Parquet: stop an actor, kill the
raylet or the GCS, write into a running job's output with another command, delete what was committed, change
the model mid-run, loop the input through a link, point the output at someone else's folder or at the input
through a bind mount, skew the lease's clocks, inject lines into a schedule recipe, and feed configs and paths
that used to end in a traceback. Each test names the case of the issue it reproduces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.jobs.conftest import (BIN, add_shards, classify, cli, descendants, ids_of, manifest_of, process_title,
                                 run, run_here, wait_for_commits)

runner = CliRunner()
SUCCESS = "_SUCCESS"


def processes(proc: subprocess.Popen, title: str) -> list[int]:
    """This run's own processes whose command line contains `title` (never another user's)."""
    return [pid for pid in descendants(proc.pid) if title in process_title(pid)]


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19 of stat(5)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, what: str = "the condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen in time")


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mounts = pytest.mark.skipif(not can_unshare(), reason="needs a private mount namespace (unshare -m)")


# -- 1, 2: liveness -------------------------------------------------------------------------------------------

def test_1_a_stopped_actor_is_replaced_and_its_unit_redone(demo):
    model, input, out = demo
    add_shards(input, 8)
    launched = time.time()
    proc = cli(*classify(model, input, out, "--batch-rows", "8", "--actors", "1", "--stall-timeout", "3"))
    wait_for_commits(out, proc)
    # the bound scales with this machine's pace now: the replacement starts an actor, loads the model and
    # redoes units, as the run did up to its first commit
    bound = 3 + 30 + 3 * (time.time() - launched)
    workers = processes(proc, "ray::UnitWorker")
    assert workers
    # the Ray started here runs its actors at niceness 0 (Ray's default, 15, starves them beside other work)
    assert [niceness(pid) for pid in workers] == [0] * len(workers)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        stdout, stderr = proc.communicate(timeout=bound + 60)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, stderr
    assert time.time() - stopped < bound, (round(time.time() - stopped), round(bound), stdout, stderr)
    assert "stalled" in stdout + stderr and "no progress for 3 s" in stdout + stderr
    assert ids_of(out) == ids_of(input) and (out / SUCCESS).exists()
    assert max(e["attempts"] for e in manifest_of(out)["shards"].values()) == 2


@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_2_a_dead_node_or_gcs_ends_the_run_with_a_summary(demo, victim):
    model, input, out = demo
    add_shards(input, 64)  # still running when its node or GCS dies (the run ends then: the rest costs nothing)
    # Ray's own detection of a dead node, made quick (its default is about 15 s): what follows is ours
    quick = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "2",
             "RAY_health_check_initial_delay_ms": "500"}
    proc = cli(*classify(model, input, out, "--batch-rows", "8", "--actors", "1"), start_new_session=True, env=quick)
    try:
        wait_for_commits(out, proc)
        targets = processes(proc, victim)
        assert targets, f"this run's {victim}"
        for pid in targets:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        stdout, stderr = proc.communicate(timeout=120)
        assert time.time() - killed < 60
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of Ray this run left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == 69, (stdout, stderr)
    line = one_error_line(stderr)
    assert ("node" if victim == "raylet" else "GCS") in line and "rerun the same command to resume" in line
    assert "shards:" in stdout  # the summary of what was done
    assert not (out / SUCCESS).exists()
    record = json.loads(next((out / "_lease").glob("*.json")).read_text())
    assert record["released"] is True


# -- 3: one owner per output, whatever the command -------------------------------------------------------------

def test_3_train_head_and_classify_share_one_owner_and_never_mix(demo, tmp_path, causal_model, trained_head):
    from tests.jobs.test_train_head import labeled

    model, input, out = demo
    add_shards(input, 10)
    labeled(tmp_path / "labeled", rows=60)
    proc = cli(*classify(model, input, out, "--batch-rows", "8"))
    wait_for_commits(out, proc)
    head = run("train-head", "--model", causal_model, "--input", tmp_path / "labeled", "--label-column", "topic",
               "--output", out)
    assert head.returncode == 75, head.stderr
    assert f"pid {proc.pid}" in one_error_line(head.stderr)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert ids_of(out) == ids_of(input) and (out / SUCCESS).exists()
    assert not (out / "config.json").exists()

    # the other way round: a finished train-head output is not a place for a classify job's files
    head = trained_head[1] / "head"
    before = sorted(p.name for p in head.iterdir())
    into = runner.invoke(app, classify(str(model), str(input), str(head)))
    assert into.exit_code == 2 and "did not write" in one_error_line(into.output)
    assert sorted(p.name for p in head.iterdir()) == before


# -- 4: success is verified on disk ----------------------------------------------------------------------------

def test_4_a_committed_file_deleted_mid_run_is_redone(ray_local, demo):
    model, input, out = demo
    add_shards(input, 8)
    # the first to commit has '#' in its name: the dispatcher's own separator in unit names (a trial found such a
    # shard left pending, the run ending 0 without _SUCCESS)
    # shard, twice the rows of the others so that it runs first (longest first)
    table = pq.read_table(input / "part-00000.parquet")
    again = table.set_column(0, "id", pa.array([i + 500 for i in table.column("id").to_pylist()]))
    again = again.set_column(again.schema.get_field_index("text"), "text",
                             pa.array([t + " (again)" for t in table.column("text").to_pylist()]))
    doubled = pa.concat_tables([table, again])  # texts of its own: the footer's byte count sees twice the text
    pq.write_table(doubled, input / "part-00000#1.parquet")
    (input / "part-00000.parquet").unlink()
    proc = cli(*classify(model, input, out, "--batch-rows", "8", "--actors", "1"))
    victim = out / "part-00000#1.parquet"
    wait_for(victim.exists, proc, what="the first commit")
    victim.unlink()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{victim.name} was committed but is no longer in the output: redone" in stdout
    assert ids_of(out) == ids_of(input) and (out / SUCCESS).exists()
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "rows: 540 written" in status.output
    # after the run: one file replaced by other bytes of the same size, another removed
    replaced, removed = out / "part-00003.parquet", out / "part-00004.parquet"
    size = replaced.stat().st_size
    time.sleep(0.01)
    replaced.write_bytes(os.urandom(size))
    removed.unlink()
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 3, status.output
    assert "missing: part-00003.parquet: part-00003.parquet was replaced after it was committed" in status.output
    assert "missing: part-00004.parquet: part-00004.parquet was committed but is no longer" in status.output
    rerun = run_here(*classify(model, input, out))
    assert rerun.returncode == 0, rerun.stderr
    assert "part-00003.parquet was replaced after it was committed (its modification time changed): redone" in \
        rerun.stdout and "part-00004.parquet was committed but is no longer in the output: redone" in rerun.stdout
    assert "shards: 8 done (6 already committed)" in rerun.stdout
    assert ids_of(out) == ids_of(input) and runner.invoke(app, ["status", str(out)]).exit_code == 0


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_4_the_output_folder_removed_or_moved_mid_run_is_not_a_success(demo, how):
    model, input, out = demo
    add_shards(input, 24)  # still running when its folder goes (it stops then: the rest costs nothing)
    proc = cli(*classify(model, input, out, "--batch-rows", "8", "--actors", "1"))  # default lease TTL: 120 s
    wait_for_commits(out, proc, at_least=2)
    if how == "removed":  # out of the job's way first: the job keeps writing while rmtree walks the folder
        trash = out.rename(out.parent / "trash")
        shutil.rmtree(trash, ignore_errors=True)
        assert not any(trash.rglob("*.parquet"))
    else:
        out.rename(out.parent / "elsewhere")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, (stdout, stderr)
    assert "lease" in one_error_line(stderr)
    assert not (out / SUCCESS).exists() and not (out.parent / "elsewhere" / SUCCESS).exists()


# -- 5: the model is pinned -------------------------------------------------------------------------------------

def test_5_a_model_changed_mid_run_is_refused_by_the_replacement_actor(ray_local, demo, tmp_path):
    from safetensors.torch import load_file, save_file

    model, input, out = demo
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    add_shards(input, 24)  # still running when the actor is replaced (the job stops then)
    proc = cli(*classify(mine, input, out, "--batch-rows", "8", "--actors", "1"))
    wait_for_commits(out, proc)
    weights = load_file(mine / "model.safetensors")
    weights["score.weight"] = -weights["score.weight"]  # retrained in place
    save_file(weights, mine / "model.safetensors", metadata={"format": "pt"})
    for pid in processes(proc, "ray::UnitWorker"):  # the actor is lost (out of memory, say) and replaced
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, (stdout, stderr)
    assert "the model changed while the job ran" in stdout + stderr
    assert not (out / SUCCESS).exists()
    fingerprints = {pq.read_schema(f).metadata[b"persimmon_batch.fingerprint"] for f in out.glob("part-*.parquet")}
    assert len(fingerprints) == 1
    # every committed file holds the first model's labels
    from pipelines import ClassificationPipeline

    first_model = ClassificationPipeline(model, dtype="float32")
    for committed in sorted(out.glob("part-*.parquet")):
        expected = first_model(pq.read_table(input / committed.name)).column("label").to_pylist()
        assert pq.read_table(committed).column("label").to_pylist() == expected, committed.name
    rerun = run_here(*classify(mine, input, out))
    assert rerun.returncode == 2 and "another model" in rerun.stderr


# -- 6: discovery follows no loop -------------------------------------------------------------------------------

def test_6_a_symlink_loop_in_the_input_lists_each_file_once(ray_local, demo, tiny_classifier):
    _, input, out = demo
    (input / "sub").mkdir()
    shutil.move(input / "part-00003.parquet", input / "sub" / "part-00003.parquet")
    (input / "sub" / "up").symlink_to("..", target_is_directory=True)
    (input / "again.parquet").symlink_to(input / "part-00000.parquet")  # the same file under a second name
    result = run_here(*classify(tiny_classifier, input, out))
    assert result.returncode == 0, result.stderr
    assert sorted(manifest_of(out)["shards"]) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
                                                  "sub/part-00003.parquet"]
    assert sorted(ids_of(out) + ids_of(out / "sub")) == list(range(240))


# -- 7: nothing of anyone else's --------------------------------------------------------------------------------

@pytest.mark.parametrize("foreign", ["_temporary/attempt_0/part-0.parquet", "_journal/notes.json", "notes.txt"])
def test_7_a_folder_with_someone_elses_files_is_refused_even_with_overwrite(demo, foreign):
    model, input, out = demo
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("theirs")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, classify(str(model), str(input), str(out), *extra))
        assert result.exit_code == 2, result.output
        assert "did not write" in one_error_line(result.output)
    assert (out / foreign).read_text() == "theirs"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [foreign]


def test_7_system_folders_are_refused_and_tilde_is_expanded(ray_local, demo, tiny_classifier, tmp_path):
    _, input, _ = demo
    job = tmp_path / "job.toml"
    ours = ("_lease", "_manifest.json", "_SUCCESS", "_journal", "_temporary")
    before = {p for p in ours if Path("/etc", p).exists()}
    try:
        for target in ("/etc", "/usr/share/persimmon-out", "/"):
            job.write_text(f'name = "n"\ntask = "classify"\nmodel = "{tiny_classifier}"\ninput = "{input}"\n'
                           f'output = "{target}"\n')
            result = runner.invoke(app, ["run", str(job)])
            assert result.exit_code == 2 and "system folder" in one_error_line(result.output), result.output
        assert {p for p in ours if Path("/etc", p).exists()} == before
        assert not Path("/usr/share/persimmon-out").exists()
    finally:  # a regression must not leave files in /etc on the machine
        for name in set(ours) - before:
            shutil.rmtree(Path("/etc", name), ignore_errors=True)
            Path("/etc", name).unlink(missing_ok=True) if Path("/etc", name).is_file() else None
        shutil.rmtree("/usr/share/persimmon-out", ignore_errors=True)
    home = tmp_path / "home"
    home.mkdir()
    job.write_text(f'name = "n"\ntask = "classify"\nmodel = "{tiny_classifier}"\ninput = "{input}"\n'
                   f'output = "~/scores"\n')
    result = run_here("run", job, cwd=tmp_path, env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert (home / "scores" / SUCCESS).exists() and not (tmp_path / "~").exists()


# -- 8: identity by device and inode ---------------------------------------------------------------------------

@needs_mounts
def test_8_an_output_inside_the_input_through_a_bind_mount_is_refused(demo, tmp_path):
    model, _, _ = demo
    lake = tmp_path / "lake"
    shutil.copytree(demo[1], lake)
    (lake / "out").mkdir()
    mounted_in, mounted_out = tmp_path / "in", tmp_path / "out"
    mounted_in.mkdir()
    mounted_out.mkdir()
    script = (f"mount --bind {lake} {mounted_in} && mount --bind {lake / 'out'} {mounted_out} && "
              f"exec {BIN / 'persimmon-batch'} classify --model {model} --input {mounted_in} --output {mounted_out}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "inside the input" in one_error_line(result.stderr)
    assert sorted(p.name for p in lake.iterdir()) == ["out", *sorted(p.name for p in demo[1].iterdir())]
    assert not any((lake / "out").iterdir())


# -- 9: lease staleness on the observer's clock ----------------------------------------------------------------

def remote_record(generation: int = 1, beat: int = 3, ttl: float = 3.0, heartbeat_at: str = "2027-11-30T00:00:00Z"):
    return {"run_id": "elsewhere01", "host": "other-host", "pid": 4242, "process_start": "1", "ttl": ttl,
            "machine": "other-host|another-boot|pid:[1]", "started_at": "2026-11-30T00:00:00Z",
            "generation": generation, "beat": beat, "heartbeat_at": heartbeat_at, "released": False}


def test_9_a_future_heartbeat_does_not_lock_the_output_forever(ray_local, demo, tiny_classifier):
    _, input, out = demo
    (out / "_lease").mkdir(parents=True)
    path = out / "_lease" / "000000000001.json"
    path.write_text(json.dumps(remote_record()))
    future = time.time() + 365 * 86400
    os.utime(path, (future, future))
    result = run_here(*classify(tiny_classifier, input, out))
    assert result.returncode == 0, result.stderr
    assert "took the output over" in result.stdout and "unchanged for 3 s" in result.stdout


def test_9_a_live_holder_with_a_clock_behind_is_not_taken_over(demo, tiny_classifier, tmp_path):
    _, input, out = demo
    (out / "_lease").mkdir(parents=True)
    path = out / "_lease" / "000000000001.json"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import json, os, sys, time\n"
        f"record = json.loads({json.dumps(json.dumps(remote_record(ttl=2.0, heartbeat_at='2025-01-01T00:00:00Z')))})\n"
        "path = sys.argv[1]\n"
        "while True:\n"
        "    record['beat'] += 1\n"
        "    open(path + '.tmp', 'w').write(json.dumps(record))\n"
        "    os.replace(path + '.tmp', path)\n"
        "    past = time.time() - 365 * 86400\n"
        "    os.utime(path, (past, past))\n"
        "    time.sleep(0.4)\n"), str(path)])
    try:
        time.sleep(1)
        result = run(*classify(tiny_classifier, input, out), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 75, result.stdout + result.stderr
    assert "host other-host" in one_error_line(result.stderr)
    assert not any(out.glob("part-*.parquet"))


@needs_mounts
def test_9_a_live_run_seen_from_another_machine_is_not_taken_over(demo):
    """The holder is a real run; the second run has another host name (a UTS namespace: to the lease, another
    machine), so only the holder's heartbeat can tell it is alive."""
    model, input, out = demo
    add_shards(input, 10)
    first = cli(*classify(model, input, out, "--batch-rows", "8", "--actors", "1", "--lease-ttl", "3"))
    wait_for_commits(out, first)
    elsewhere = subprocess.run(["unshare", "--uts", "sh", "-c", f"hostname other-machine && exec "
                                f"{BIN / 'persimmon-batch'} {' '.join(map(str, classify(model, input, out)))}"],
                               capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 75, elsewhere.stdout + elsewhere.stderr
    assert f"pid {first.pid}" in one_error_line(elsewhere.stderr) and "heartbeat changed" in elsewhere.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert ids_of(out) == ids_of(input) and (out / SUCCESS).exists()


def test_9_a_ttl_written_in_the_record_is_bounded(demo, tiny_classifier):
    _, input, out = demo
    (out / "_lease").mkdir(parents=True)
    (out / "_lease" / "000000000001.json").write_text(json.dumps(remote_record(ttl=1e12)))
    result = run(*classify(tiny_classifier, input, out, "--lease-ttl", "2"), timeout=120)
    assert result.returncode == 75, result.stdout + result.stderr
    line = one_error_line(result.stderr)
    assert "stale after 3600 s" in line and "unchanged for 2 s so far" in line


# -- 10: recipes ------------------------------------------------------------------------------------------------

def test_10_a_job_name_cannot_inject_lines_into_a_recipe(demo, tmp_path):
    model, input, _ = demo
    job = tmp_path / "job.toml"
    job.write_text(f'name = "nightly\\n* * * * * touch /tmp/pwned"\ntask = "classify"\nmodel = "{model}"\n'
                   f'input = "{input}"\noutput = "{tmp_path / "out"}"\n')
    for command in (["validate", str(job)], ["schedule", str(job), "--format", "cron"],
                    ["schedule", str(job), "--format", "systemd"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "name: " in result.output and "A-Za-z0-9._-" in result.output
        assert "* * * * *" not in result.output.split("name:", 1)[0]
    # characters of the job file's path that mean something to cron, systemd or YAML stay plain text
    odd = tmp_path / 'jobs 100%h dir' / 'j"x.toml'
    odd.parent.mkdir()
    odd.write_text(job.read_text().replace('nightly\\n* * * * * touch /tmp/pwned', "nightly"))
    cron = runner.invoke(app, ["schedule", str(odd), "--format", "cron"])
    assert cron.exit_code == 0 and "100\\%h" in cron.output and "100%h" not in cron.output, cron.output
    systemd = runner.invoke(app, ["schedule", str(odd), "--format", "systemd"])
    assert systemd.exit_code == 0 and "100%%h" in systemd.output
    import yaml

    k8s = yaml.safe_load(runner.invoke(app, ["schedule", str(odd), "--format", "k8s"]).stdout)
    assert k8s["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1] == '/jobs/j"x.toml'



# -- 11: one line, never a traceback ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("eos_token_id", "2", "eos_token_id: expected an integer"),
    ("partial_rotary_factor", "0.5", "partial_rotary_factor: expected a number"),
    ("layer_norm_eps", None, "layer_norm_eps: expected a number"),
    ("id2label", [], "id2label: expected an object"),
    ("rope_scaling", "linear", "rope_scaling: expected an object"),
    ("num_hidden_layers", 100000, "num_hidden_layers"),
])
def test_11_config_values_of_the_wrong_type_are_one_line(demo, tmp_path, field, value, message):
    model, input, out = demo
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    started = time.time()
    result = runner.invoke(app, classify(str(bad), str(input), str(out)))
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result.output)
    assert time.time() - started < 30 and not out.exists()


@needs_mounts
@pytest.mark.parametrize("how", ["read-only", "full"])
def test_11_an_output_that_cannot_be_written_mid_run_is_one_line_and_leaves_nothing_half_written(demo, tmp_path,
                                                                                                  how):
    model, input, _ = demo
    add_shards(input, 10)
    out = tmp_path / "mnt"
    out.mkdir()
    size = "64m" if how == "read-only" else "100k"  # 100 kB: about six of the ten committed files
    # what a run leaves is removed, except on a read-only folder, where nothing can be (the next run does it)
    temporaries = "" if how == "read-only" else " -o -path '*_temporary/*' -type f"
    script = (f"mount -t tmpfs -o size={size} none {out} || exit 99; {BIN / 'persimmon-batch'} classify --model {model} "
              f"--input {input} --output {out}/scores --batch-rows 8 --actors 1; rc=$?; echo LEFTOVERS:; "
              f"find {out}/scores -name '._manifest.json.*' -o -name '*.tmp'{temporaries}; "
              "exit $rc")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def inside(command: str) -> str:
        return subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "sh", "-c", command], capture_output=True,
                              text=True).stdout

    try:
        if how == "read-only":
            wait_for(lambda: int(inside(f"ls {out}/scores | grep -c '^part-' || true").strip() or 0) >= 1, proc,
                     timeout=240, what="a commit")
            # a remount to read-only is refused (EBUSY, exit 32) while a file on it is open for writing, as a
            # part file is for a moment: tried again until it holds, within a deadline
            deadline = time.monotonic() + 60
            while True:
                remount = subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "mount", "-o", "remount,ro", str(out)],
                                         capture_output=True, text=True)
                if remount.returncode == 0 or proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert remount.returncode == 0, remount.stderr
        else:
            wait_for(lambda: "scores" in inside(f"ls {out}"), proc, timeout=240, what="the output folder")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (stdout, stderr)
    reason = "Read-only file system" if how == "read-only" else "No space left on device"
    assert reason in one_error_line(stderr) and "rerun" in stderr
    assert "shards:" in stdout  # the summary of what was committed
    assert stdout.split("LEFTOVERS:")[1].strip() == "", "no half-written manifest, lease record or temporary"


def test_11_nested_and_foreign_outputs_and_manifests_are_one_line(ray_local, demo, tiny_classifier):
    _, input, out = demo
    assert run_here(*classify(tiny_classifier, input, out)).returncode == 0
    nested = runner.invoke(app, classify(str(tiny_classifier), str(input), str(out / "scores")))
    assert nested.exit_code == 2 and "inside the output of another job" in one_error_line(nested.output)
    (out / "part-00001.parquet").unlink()
    (out / "part-00001.parquet").mkdir()  # a folder where a committed file was
    (out / "part-00001.parquet" / "x.parquet").write_text("")
    again = runner.invoke(app, classify(str(tiny_classifier), str(input), str(out)))
    assert again.exit_code == 2 and "did not write" in one_error_line(again.output)
    for text in ("[]", '{"shards": []}', '"x"', '{"shards": {"a": 5}}', '{"shards": {"a": {"rows": "many"}}}',
                 '{"runs": 5, "shards": {}}', '{"shards": {"a": {"input_identity": "x"}}}'):
        other = out.parent / "foreign"
        other.mkdir(exist_ok=True)
        (other / "_manifest.json").write_text(text)
        for command in (["status", str(other)], classify(str(tiny_classifier), str(input), str(other))):
            result = runner.invoke(app, command)
            assert result.exit_code == 2 and "not a persimmon-batch manifest" in one_error_line(result.output)


def test_11_unreadable_and_odd_inputs_are_one_line(demo, tmp_path):
    model, input, out = demo
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        result = runner.invoke(app, classify(str(model), str(path), str(out)))
        assert result.exit_code == 2 and "not a regular file" in one_error_line(result.output)
    (input / "proc").symlink_to("/proc/self", target_is_directory=True)
    listed = runner.invoke(app, ["status", str(out)])  # nothing written: no manifest
    assert listed.exit_code == 2
    from jobs.inputs.discovery import discover

    assert len(discover(str(input)).shards) == 4  # the link into /proc is not walked
    (input / "proc").unlink()
    locked = input / "locked"
    locked.mkdir()
    pq.write_table(pa.table({"id": [7], "text": ["hidden"]}), locked / "x.parquet")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root: drop the capability that reads past permissions
            command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                       "--bounding-set=-dac_override,-dac_read_search", str(BIN / "persimmon-batch")]
        else:
            command = [str(BIN / "persimmon-batch")]
        result = subprocess.run([*command, *classify(model, input, out)], capture_output=True, text=True,
                                timeout=120)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert "cannot read" in one_error_line(result.stderr) and "locked" in result.stderr
    assert not out.exists()


# -- 12: the smaller ones ---------------------------------------------------------------------------------------

def test_12_absurd_options_a_refused_cluster_and_status_exit_codes(demo, causal_model, tmp_path):
    model, input, out = demo
    result = runner.invoke(app, ["generate", "--model", str(causal_model), "--input", str(input), "--output",
                                 str(out), "--max-new-tokens", "1000000000"])
    assert result.exit_code == 2 and "max_new_tokens" in one_error_line(result.output)
    assert "window" in result.output
    refused = runner.invoke(app, classify(str(model), str(input), str(out), "--address", "127.0.0.1:9"))
    assert refused.exit_code == 2 and "cannot join" in one_error_line(refused.output)
    assert not out.exists(), "a run that never started leaves nothing behind"

    # status: 1 failed shards, 3 incomplete, 0 complete
    (input / "broken.parquet").write_bytes(b"garbage")
    assert run(*classify(model, input, out)).returncode == 1
    assert runner.invoke(app, ["status", str(out)]).exit_code == 1
    manifest = manifest_of(out)
    del manifest["shards"]["broken.parquet"]
    manifest["shards"]["part-00002.parquet"]["state"] = "pending"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert runner.invoke(app, ["status", str(out)]).exit_code == 3
    manifest["shards"]["part-00002.parquet"]["state"] = "done"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert runner.invoke(app, ["status", str(out)]).exit_code == 0


def test_12_an_actor_killed_for_memory_says_so(demo):
    model, input, out = demo
    # Ray's own memory monitor, told that any use is too much: it kills the worker as the OOM killer would
    result = run(*classify(model, input, out, "--max-attempts", "1"),
                 env={"RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "50"}, timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "out of memory" in text and "--batch-tokens" in text and "SYSTEM_ERROR" not in text
