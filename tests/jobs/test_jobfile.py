"""Job files: table-driven validation, date partitions, backfill, schedule recipes."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.jobfile import JobFileError, job_spec, read_job_file, run_dates
from jobs.output.manifest import MANIFEST

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
runner = CliRunner()


def write_job(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(body)
    return path


def good(model: Path, root: Path) -> str:
    return (f'name = "nightly"\ntask = "classify"\nmodel = "{model}"\ninput = "{root}/input/dt={{date}}/"\n'
            f'output = "{root}/out/dt={{ds}}/"\n\n[options]\ndtype = "float32"\n\n[runner]\nactors = 1\n')


BAD = [
    ("unknown top key", 'colour = "red"', "colour: unknown key"),
    ("missing name", None, "name: missing"),
    ("task value", None, "task: expected one of ['classify', 'generate', 'embed', 'score', 'openai-batch'], got 'summarize'"),
    ("task typo", None, "got 'clasify' (did you mean 'classify'?)"),
    ("task not a string", None, "task: expected a string"),
    ("csv delimiter", 'csv_delimiter = ";;"', "csv_delimiter must be one character"),
    ("option type", '[options]\nmax_length = "2k"', 'options.max_length: expected an integer, got \'2k\''),
    ("unknown option", '[options]\nmax_new_tokens = 5', "options.max_new_tokens: unknown option for task 'classify'"),
    ("dtype value", '[options]\ndtype = "int4"', "options.dtype: expected one of"),
    ("runner type", '[runner]\nactors = "many"', "runner.actors: expected an integer, got 'many'"),
    ("runner key", '[runner]\nnodes = 3', "runner.nodes: unknown key"),
    ("bool is not int", '[runner]\nactors = true', "runner.actors: expected an integer, got True"),
    ("backup_tasks type", '[runner]\nbackup_tasks = "yes"', "runner.backup_tasks: expected true or false, got 'yes'"),
    ("date", 'date = "last tuesday"', "date: expected YYYY-MM-DD, 'today' or 'yesterday'"),
    ("placeholder", None, "input: unknown placeholder(s) ['day']"),
    ("model missing", None, "model: directory /nonexistent/model does not exist"),
    ("toml syntax", "name = ", "not valid TOML"),
]


@pytest.mark.parametrize("case,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_job_files_name_the_key(demo_root, tmp_path, case, extra, message):
    body = good(demo_root / "model", tmp_path)
    if case == "task value":
        body = body.replace('task = "classify"', 'task = "summarize"')
    elif case == "task typo":
        body = body.replace('task = "classify"', 'task = "clasify"')
    elif case == "task not a string":
        body = body.replace('task = "classify"', 'task = ["classify"]')
    elif case == "missing name":
        body = body.replace('name = "nightly"\n', "")
    elif case == "placeholder":
        body = body.replace("dt={date}", "dt={day}")
    elif case == "model missing":
        body = body.replace(str(demo_root / "model"), "/nonexistent/model")
    elif extra.startswith("["):  # set one key of a section: replace the line if the key is there
        section, line = extra.split("\n")
        key = line.split("=")[0].strip()
        existing = next((l for l in body.splitlines() if l.startswith(key + " =")), None)
        if existing is not None:
            body = body.replace(existing, line)
        elif section in body:
            body = body.replace(section + "\n", extra + "\n")
        else:
            body += "\n" + extra + "\n"
    else:
        body = extra + "\n" + body
    with pytest.raises(JobFileError) as info:
        read_job_file(write_job(tmp_path, body))
    assert any(message in p for p in info.value.problems), info.value.problems


def test_every_problem_listed_at_once(tmp_path):
    body = 'name = 3\ntask = "summarize"\nmodel = "/nope"\n[options]\nmax_length = -1\n'
    with pytest.raises(JobFileError) as info:
        read_job_file(write_job(tmp_path, body))
    problems = "\n".join(info.value.problems)
    for expected in ("name: expected a string", "task: expected one of", "input: missing", "output: missing",
                     "model: directory /nope does not exist"):
        assert expected in problems


def test_validate_starts_no_ray(demo_root, tmp_path):
    job = write_job(tmp_path, good(demo_root / "model", tmp_path).replace('dtype = "float32"', 'dtype = "fp8"'))
    code = (f"import sys\nfrom typer.testing import CliRunner\nfrom jobs.cli import app\n"
            f"r = CliRunner().invoke(app, ['validate', {str(job)!r}])\n"
            f"print(r.exit_code, 'ray' in sys.modules)\nprint(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("2 False") and "options.dtype: expected one of" in out


def test_examples_are_valid_with_a_real_model(demo_root, causal_model, tmp_path):
    shutil.copy(EXAMPLES / "ticket.schema.json", tmp_path)  # nightly-extract's schema, beside the job file
    for example in sorted(EXAMPLES.glob("*.toml")):
        text = example.read_text()
        model = text.split('model = "')[1].split('"')[0]
        real = causal_model if 'task = "generate"' in text else demo_root / "model"
        job = write_job(tmp_path, text.replace(model, str(real)))
        raw = read_job_file(job)
        spec = job_spec(raw, run_dates(raw, "2026-11-23")[0], folder=job.parent)
        assert "dt=2026-11-23" in spec.output
        assert "dt=2026-11-23" in spec.input or "{date}" not in raw["input"]
        spec.validate()
        if "json_schema" in text:  # the file's content travels in the spec (actors may run elsewhere)
            assert spec.options.json_schema == (EXAMPLES / "ticket.schema.json").read_text()


def partition(root: Path, demo_root: Path, day: str) -> None:
    folder = root / "input" / f"dt={day}"
    folder.mkdir(parents=True)
    for shard in sorted((demo_root / "input").glob("*.parquet"))[:2]:
        shutil.copy(shard, folder)


@pytest.mark.slow  # starts Ray (or the CLI in a subprocess)
def test_runs_per_date_and_backfill(ray_local, demo_root, tmp_path):
    for day in ("2026-11-21", "2026-11-22", "2026-11-23"):
        partition(tmp_path, demo_root, day)
    job = write_job(tmp_path, good(demo_root / "model", tmp_path))
    first = runner.invoke(app, ["run", str(job), "--date", "2026-11-23"])
    assert first.exit_code == 0, first.output
    out = tmp_path / "out" / "dt=2026-11-23"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert len(stamps) == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["spec"]["name"] == "nightly" and manifest["spec"]["date"] == "2026-11-23"
    assert manifest["model"]["checksum"] and manifest["package_version"] and manifest["finished_at"]
    assert manifest["summary"]["rows"] == 120
    again = runner.invoke(app, ["run", str(job), "--date", "2026-11-23"])  # a no-op
    assert again.exit_code == 0 and "2 done (2 already committed)" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps
    # 11-20 has no input yet: that date is refused, the others still run, the worst status is the exit status
    backfill = runner.invoke(app, ["run", str(job), "--from", "2026-11-20", "--to", "2026-11-23"])
    assert backfill.exit_code == 2, backfill.output
    assert "dt=2026-11-20/ does not exist" in backfill.output
    assert backfill.output.count("(0 already committed)") == 2 and backfill.output.count("(2 already committed)") == 1
    summary = backfill.output[backfill.output.index("== nightly: 3 of 4 dates done"):].splitlines()  # one line a date
    assert [line for line in summary[1:] if line.startswith("  2026-")] == ["  2026-11-20: refused (exit 2)", "  2026-11-21: done (exit 0)", "  2026-11-22: done (exit 0)",
                           "  2026-11-23: done (exit 0)"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dt=2026-11-21", "dt=2026-11-22", "dt=2026-11-23"]
    for day in ("2026-11-21", "2026-11-22"):
        assert pq.read_table(tmp_path / "out" / f"dt={day}").num_rows == 120
    bad = runner.invoke(app, ["run", str(job), "--from", "2026-11-23", "--to", "2026-11-21"])
    assert bad.exit_code == 2 and "is before --from" in bad.output


@pytest.mark.slow  # starts Ray (or the CLI in a subprocess)
def test_schedule_recipes(demo_root, tmp_path):
    partition(tmp_path, demo_root, "2026-11-24")
    body = good(demo_root / "model", tmp_path).replace('task = "classify"', 'task = "classify"\ndate = "2026-11-24"')
    job = write_job(tmp_path, body)
    cron = runner.invoke(app, ["schedule", str(job), "--format", "cron", "--at", "02:30"])
    assert cron.exit_code == 0, cron.output
    line = [l for l in cron.output.splitlines() if not l.startswith("#")][0]
    fields = line.split(" ", 5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    command = shlex.split(fields[5].split(" >> ")[0])
    assert command[1:] == ["run", str(job)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # the line's command really runs
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "out" / "dt=2026-11-24").num_rows == 120
    systemd = runner.invoke(app, ["schedule", str(job), "--format", "systemd"]).output
    assert "OnCalendar=*-*-* 02:00:00 UTC" in systemd and f"ExecStart={shlex.join(command)}" in systemd
    manifest = yaml.safe_load("\n".join(l for l in runner.invoke(app, ["schedule", str(job), "--format", "k8s"]).stdout.splitlines()))
    assert manifest["kind"] == "CronJob" and manifest["spec"]["schedule"] == "0 2 * * *"
    container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["persimmon-batch", "run", "/jobs/job.toml"]
    assert runner.invoke(app, ["schedule", str(job), "--at", "25:00"]).exit_code == 2


@pytest.mark.parametrize("task, options, reserved", [
    ("generate", {"max_new_tokens": 100}, 100), ("score", {}, 0), ("embed", {}, 0), ("openai-batch", {}, 0)])
def test_the_window_rule_is_one_rule_for_the_fingerprint_and_the_pipeline(task, options, reserved):
    """A max_length counts as "none" in the fingerprint exactly where the pipeline's prompt limit no longer
    changes with it: both read the task's options' one window rule (openai-batch reads the whole window; its
    max_new_tokens is only a default for lines that give none)."""
    from persimmon.config import PersimmonConfig
    from jobs.spec import JobSpec

    config = PersimmonConfig(max_position_embeddings=512)
    spec = JobSpec(task, "m", "in", "out", options=options)
    room = 512 - reserved
    assert spec.options.prompt_limit(512) == room
    for max_length in (room - 1, room, room + 5):
        limited = JobSpec(task, "m", "in", "out", options={**options, "max_length": max_length})
        same = limited.fingerprint("x", "float32", config) == spec.fingerprint("x", "float32", config)
        assert same == (limited.options.prompt_limit(512) == spec.options.prompt_limit(512)), max_length
