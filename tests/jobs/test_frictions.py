"""What a new user trips over, through the real CLI: help that reads like a command's, dtype aliases, "did
you mean" for keys, job-file paths shown resolved, Kubernetes recipes that warn of what will not hold in a pod."""

from __future__ import annotations

import pytest

from pipelines.options import GenerateOptions
from tests.jobs.conftest import run_here


@pytest.mark.parametrize("command", [None, "classify", "generate", "openai-batch", "run", "status"])
def test_help_shows_no_python_types(command):
    done = run_here(*([command] if command else []), "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0
    for noise in ("<bool>", "list[str]", "{job}", "{output}"):
        assert noise not in done.stdout, noise


@pytest.mark.parametrize("alias, dtype", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_aliases_are_the_dtype(demo_root, tmp_path, alias, dtype):
    done = run_here("classify", "--model", demo_root / "model", "--input", tmp_path / "missing", "--output",
                    tmp_path / "out", "--dtype", alias)
    assert done.returncode == 2 and "input" in done.stderr and "does not exist" in done.stderr  # parsed, then refused
    assert GenerateOptions(dtype=alias).dtype == dtype


def test_job_file_keys_get_a_suggestion_and_paths_are_shown_resolved(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "job.toml"
    job.write_text('name = "n"\ntask = "classify"\nmodel = "../models/triage"\ninput = "in"\noutput = "out"\n'
                   'text_colum = "body"\n[options]\nmax_lenght = 10\n')
    done = run_here("validate", job)
    assert done.returncode == 2
    assert "text_colum: unknown key (did you mean 'text_column'?)" in done.stderr
    assert "options.max_lenght: unknown option for task 'classify' (did you mean 'max_length'?)" in done.stderr
    assert f"../models/triage (= {tmp_path / 'models' / 'triage'}, relative to the job file) does not exist" \
        in done.stderr


def test_a_k8s_recipe_warns_of_what_will_not_hold_in_a_pod(demo_root, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'name = "n"\ntask = "classify"\nmodel = "{demo_root / "model"}"\ninput = "in/"\noutput = "out/"\n')
    done = run_here("schedule", job, "--format", "k8s")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING: ")]
    assert any("input 'in/' is relative" in w for w in warnings) and any("output 'out/'" in w for w in warnings)
    assert any("is a local path" in w for w in warnings) and any("no runner.address" in w for w in warnings)
    assert all(f"# {w}" in done.stdout for w in warnings)  # in the recipe too
    job.write_text('name = "n"\ntask = "classify"\nmodel = "s3://models/triage"\ninput = "s3://lake/in/"\n'
                   'output = "s3://lake/out/"\n[runner]\naddress = "ray://head:10001"\n')
    done = run_here("schedule", job, "--format", "k8s")
    assert done.returncode == 0 and "WARNING" not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["classify", "generate", "openai-batch", "run"])
def test_help_at_80_columns_shows_every_flag_name_whole(command):
    import typer

    from jobs.cli import app

    done = run_here(command, "--help", env={"COLUMNS": "80"})
    assert done.returncode == 0
    click_command = typer.main.get_command(app).commands[command]
    names = [name for param in click_command.params for name in param.opts if name.startswith("--")]
    assert names and all(name in done.stdout for name in names), [n for n in names if n not in done.stdout]
    assert "…" not in done.stdout and max(map(len, done.stdout.splitlines())) <= 80
