"""persimmon-batch: the command line. It parses and validates, builds a JobSpec and calls one function."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cluster_auth import use_token_auth
from .shards import Manifest, resolve
from .spec import JobSpec, RunnerSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the Persimmon language model over Parquet datasets on Ray.")


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Side(str, enum.Enum):
    left = "left"
    right = "right"


Model = Annotated[Path, typer.Option("--model", help="Checkpoint directory (config.json, safetensors, tokenizer.model).",
                                     exists=True, file_okay=False, resolve_path=True)]
Input = Annotated[str, typer.Option("--input", help="Parquet file, directory or glob; local or a URI (s3://, gs://, hdfs://).")]
Output = Annotated[str, typer.Option("--output", help="Output directory (local or URI): one file per input shard.")]
TextColumn = Annotated[str, typer.Option(help="Column holding the text.")]
Actors = Annotated[Optional[int], typer.Option(min=1, help="Actors (default: one per GPU, else one per 4 CPUs).")]
GpusPerActor = Annotated[float, typer.Option(min=0, help="GPUs per actor where the cluster has GPUs.")]
DTypeOpt = Annotated[DType, typer.Option(help="Model dtype; auto = the checkpoint's (bf16 for Persimmon-8B).")]
MaxLength = Annotated[Optional[int], typer.Option(min=1, help="Tokens per text (default: the model's window).")]
BatchTokens = Annotated[int, typer.Option(min=1, help="Padded tokens per forward pass.")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster: auto, HOST:PORT or ray://...; none = start Ray here.")]
Overwrite = Annotated[bool, typer.Option(help="Replace outputs of a different model or options.")]
BatchRows = Annotated[int, typer.Option(min=1, help="Rows per record batch read from Parquet.")]


def _unescape(text: str) -> str:
    """Shells pass "\\n" literally; templates and stop strings mean a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(spec: JobSpec, exit_at_end: bool = True) -> int:
    """Run one job; returns its exit status (0, 1 failed shards, 130 interrupted) or exits with it."""
    use_token_auth(spec.runner.address)  # before Ray is imported: it reads RAY_AUTH_MODE then
    from .runner import JobConflict, run_job  # imports Ray: only once arguments are known to be good

    try:
        spec.validate()
    except ValueError as exc:
        _fail(str(exc))
    try:
        result = run_job(spec)
    except (JobConflict, ConnectionError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:  # the job could not start on the cluster
        _fail(str(exc), code=1)
    typer.echo(result.summary())
    code = 130 if result.interrupted else 0 if result.ok else 1
    if exit_at_end and code:
        raise typer.Exit(code)
    return code


def _runner(actors, gpus_per_actor, address, batch_rows) -> RunnerSettings:
    return RunnerSettings(actors=actors, gpus_per_actor=gpus_per_actor, address=address, batch_rows=batch_rows)


@app.command()
def classify(
    model: Model,
    input: Input,
    output: Output,
    text_column: TextColumn = "text",
    actors: Actors = None,
    gpus_per_actor: GpusPerActor = 1.0,
    dtype: DTypeOpt = DType.auto,
    max_length: MaxLength = None,
    batch_tokens: BatchTokens = 16384,
    address: Address = None,
    candidate_labels: Annotated[Optional[str], typer.Option(help="a,b,c: zero-shot over these labels with a causal LM.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="Zero-shot prompt with {text} and {labels}.")] = None,
    truncation_side: Annotated[Side, typer.Option(help="Which end of a too-long text to drop.")] = Side.right,
    threshold: Annotated[float, typer.Option(help="Multi-label: probability above which a label is given.")] = 0.5,
    batch_rows: BatchRows = 1024,
    overwrite: Overwrite = False,
) -> None:
    """Classify every row: label, score and probs (or labels / score for multi-label and regression models)."""
    options: dict = {"dtype": dtype.value, "max_length": max_length, "batch_tokens": batch_tokens,
                     "truncation_side": truncation_side.value, "threshold": threshold}
    if candidate_labels is not None:
        labels = [label.strip() for label in candidate_labels.split(",")]
        if len(labels) < 2 or not all(labels):
            _fail(f"--candidate-labels needs at least two non-empty labels, got {candidate_labels!r}")
        options["candidate_labels"] = labels
        if prompt_template is not None:
            options["prompt_template"] = _unescape(prompt_template)
    elif prompt_template is not None:
        _fail("--prompt-template applies to zero-shot classification: give --candidate-labels too")
    _run(JobSpec("classify", str(model), input, output, text_column, options,
                 _runner(actors, gpus_per_actor, address, batch_rows), overwrite=overwrite))


@app.command()
def generate(
    model: Model,
    input: Input,
    output: Output,
    text_column: TextColumn = "text",
    prompt_template: Annotated[str, typer.Option(help="Prompt around each text; {text} is replaced.")] = "human: {text}\\n\\nadept:",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most per row.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed: a row's completion depends on (seed, prompt) only.")] = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable); the completion ends before it.")] = None,
    actors: Actors = None,
    gpus_per_actor: GpusPerActor = 1.0,
    dtype: DTypeOpt = DType.auto,
    max_length: MaxLength = None,
    batch_tokens: BatchTokens = 16384,
    address: Address = None,
    truncation_side: Annotated[Side, typer.Option(help="Which end of a too-long text to drop.")] = Side.left,
    compile: Annotated[Optional[bool], typer.Option(help="Compiled decode step (default: on for CUDA).")] = None,
    batch_rows: BatchRows = 1024,
    overwrite: Overwrite = False,
) -> None:
    """Generate a completion for every row: completion, finish_reason, prompt_tokens, completion_tokens."""
    template = _unescape(prompt_template)
    if template.count("{text}") != 1:
        _fail(f"--prompt-template must contain {{text}} exactly once, got {prompt_template!r}")
    if top_p == 0:
        _fail("--top-p must be in (0, 1]")
    options = {"dtype": dtype.value, "max_length": max_length, "batch_tokens": batch_tokens,
               "prompt_template": template, "max_new_tokens": max_new_tokens, "temperature": temperature,
               "top_k": top_k, "top_p": top_p, "seed": seed, "stop": [_unescape(s) for s in stop or []],
               "truncation_side": truncation_side.value, "compile": compile}
    _run(JobSpec("generate", str(model), input, output, text_column, options,
                 _runner(actors, gpus_per_actor, address, batch_rows), overwrite=overwrite))


JobFile = Annotated[Path, typer.Argument(help="A job file (TOML).", exists=True, dir_okay=False, resolve_path=True)]


def _read(job: Path, check_model: bool = True) -> dict:
    from .jobfile import JobFileError, read_job_file

    try:
        return read_job_file(job, check_model)
    except JobFileError as exc:
        _fail(str(exc))


@app.command()
def run(
    job: JobFile,
    date: Annotated[Optional[str], typer.Option(help="The run's date, YYYY-MM-DD / today / yesterday "
                                                     "(default: the file's date, else today in UTC).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="Backfill: first date (with --to).")] = None,
    end: Annotated[Optional[str], typer.Option("--to", help="Backfill: last date, inclusive.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Override the file's runner.address.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Run a job file for a date (or each date of --from/--to); dates already done are no-ops."""
    from .jobfile import job_spec, run_dates

    raw = _read(job)
    try:
        dates = run_dates(raw, date, start, end)
    except ValueError as exc:
        _fail(str(exc))
    worst = 0
    for day in dates:
        typer.echo(f"== {raw['name']} for {day}")
        spec = job_spec(raw, day, overwrite)
        if address is not None:
            spec.runner.address = address
        worst = max(worst, _run(spec, exit_at_end=False))
    if worst:
        raise typer.Exit(worst)


@app.command()
def validate(job: JobFile) -> None:
    """Check a job file (keys, types, values, model directory) without running anything."""
    raw = _read(job)
    typer.echo(f"{job}: valid {raw['task']} job {raw['name']!r}")


@app.command()
def submit(
    job: JobFile,
    address: Annotated[str, typer.Option(help="The cluster's Ray dashboard, e.g. http://HEAD:8265.")],
    date: Annotated[Optional[str], typer.Option(help="The run's date (default: the file's date, else today).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends; exit 1 if it failed.")] = False,
) -> None:
    """Send a job file's run for a date to a Ray cluster (Ray Jobs API). The submission id is the job's name
    and date, so a duplicate trigger for the same date is refused by Ray instead of running twice."""
    from .jobfile import run_dates

    raw = _read(job, check_model=False)  # the model lives on the cluster
    try:
        day = run_dates(raw, date)[0].isoformat()
    except ValueError as exc:
        _fail(str(exc))
    use_token_auth(address)
    from .runner import AlreadySubmitted, follow_job, submit_job

    try:
        sid = submit_job(job.read_text(), raw["name"], day, address)
    except AlreadySubmitted as exc:
        _fail(str(exc), code=1)
    except (ConnectionError, RuntimeError) as exc:
        _fail(f"cannot submit to {address}: {exc}")
    typer.echo(f"submitted {sid}")
    if wait and not follow_job(sid, address):
        raise typer.Exit(1)


class ScheduleFormat(str, enum.Enum):
    cron = "cron"
    systemd = "systemd"
    k8s = "k8s"


@app.command()
def schedule(
    job: JobFile,
    format: Annotated[ScheduleFormat, typer.Option(help="cron line, systemd service + timer, or Kubernetes CronJob.")] = ScheduleFormat.cron,
    at: Annotated[str, typer.Option(help="Time of day, HH:MM UTC.")] = "02:00",
    image: Annotated[str, typer.Option(help="Container image (k8s).")] = "persimmon-batch:latest",
) -> None:
    """Print a daily schedule for a job file."""
    from .schedule import render

    raw = _read(job)
    try:
        typer.echo(render(job, raw["name"], format.value, at=at, image=image), nl=False)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def status(output: Annotated[str, typer.Argument(help="A job's output directory.")]) -> None:
    """What is done, what is left, what failed, with row counts."""
    fs, base = resolve(output)
    try:
        manifest = Manifest.load(fs, base)
    except ValueError as exc:
        _fail(str(exc))
    if manifest is None:
        _fail(f"no manifest in {output}: no job has written there")
    counts = manifest.counts()
    shards = manifest.shards
    rows = sum(s.get("rows", 0) for s in shards.values() if s.get("state") == "done")
    errors = sum(s.get("errors", 0) for s in shards.values() if s.get("state") == "done")
    spec = manifest.data.get("spec", {})
    typer.echo(f"job: {spec.get('task')} with {manifest.data.get('model', {}).get('path')} "
               f"(fingerprint {manifest.data.get('fingerprint')})")
    typer.echo(f"shards: {counts['done']} done, {counts['failed']} failed, {counts['pending']} left, of {len(shards)}")
    typer.echo(f"rows: {rows} written, {errors} with errors")
    for name, entry in sorted(shards.items()):
        if entry.get("state") == "failed":
            typer.echo(f"failed: {name}: {entry.get('error')}")
    typer.echo("complete" if counts["done"] == len(shards) else "incomplete: rerun the job to finish it")


@app.command()
def convert(
    release_dir: Annotated[Path, typer.Argument(help="Adept release tar contents (iter_*/mp_rank_00/model_optim_rng.pt).",
                                                exists=True, resolve_path=True)],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the HF-layout checkpoint.")],
    dtype: Annotated[DType, typer.Option(help="dtype to store (the release was trained in bf16).")] = DType.bfloat16,
) -> None:
    """Convert Adept's release checkpoint to the HF layout (config.json, safetensors, tokenizer.model)."""
    from persimmon.convert import ConversionError, convert_release

    try:
        out = convert_release(release_dir, out_dir, dtype="bfloat16" if dtype == DType.auto else dtype.value)
    except (ConversionError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"converted": str(out)}))


def main() -> None:
    app(prog_name="persimmon-batch")


if __name__ == "__main__":
    sys.exit(main())
