"""persimmon-batch: the command line. It parses and validates, builds a JobSpec and calls one function."""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.options import (ClassifyOptions, EmbedOptions, GenerateOptions, ModelOptions, Options, _value_type,
                               default_of)

from .cluster_auth import use_token_auth
from .manifest import Manifest
from .shards import resolve
from .spec import JobSpec, RunnerSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the Persimmon language model over Parquet datasets on Ray.")

EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the output; try again later


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


Model = Annotated[Path, typer.Option("--model", help="Checkpoint directory (config.json, safetensors, tokenizer.model).",
                                     exists=True, file_okay=False, resolve_path=True)]
Input = Annotated[str, typer.Option("--input", help="Parquet file, directory or glob; local or a URI (s3://, gs://, hdfs://).")]
Output = Annotated[str, typer.Option("--output", help="Output directory (local or URI): one file per input shard.")]
TextColumn = Annotated[str, typer.Option(help="Column holding the text.")]
Overwrite = Annotated[bool, typer.Option(help="Replace outputs of a different model or options, and remove the "
                                              "outputs of shards gone from the input.")]


def _unescape(text: str) -> str:
    """Shells pass "\\n" literally; templates and stop strings mean a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_parameter(f: dataclasses.Field, hint) -> inspect.Parameter:
    """A typer option for one options field: its type, default, choices, bounds and help from the field."""
    meta = f.metadata
    kind, optional = _value_type(hint)
    default = default_of(f)
    if meta.get("choices"):
        kind = enum.Enum(f.name.title().replace("_", ""), {c: c for c in meta["choices"]}, type=str)
        default = None if default is None else kind(default)
    elif meta.get("cli") == "comma":
        kind, optional, default = str, True, None
    elif typing.get_origin(kind) is list:
        kind, optional, default = list[str], True, None
    info = typer.Option(_flag(f.name), help=meta.get("help"), min=meta.get("min"), max=meta.get("max"))
    annotation = Optional[kind] if optional else kind
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def _from_cli(f: dataclasses.Field, value):
    if isinstance(value, enum.Enum):
        value = value.value
    if f.metadata.get("cli") == "comma" and value is not None:
        value = [part.strip() for part in value.split(",")]
    elif value is None and isinstance(default_of(f), list):
        value = default_of(f)
    if f.metadata.get("escapes") and value is not None:
        value = [_unescape(v) for v in value] if isinstance(value, list) else _unescape(value)
    return value


def with_options(**groups: type[Options]):
    """Give a command one flag per field of each options dataclass (name -> class); the command receives
    the built dataclasses under those names. Every problem (bounds, templates, labels) ends the command
    with exit 2 before anything starts."""
    def wrap(func):
        base = inspect.signature(func, eval_str=True)
        fixed = [p for p in base.parameters.values() if p.name not in groups]
        extra = []
        for cls in groups.values():
            hints = typing.get_type_hints(cls)
            extra += [_cli_parameter(f, hints[f.name]) for f in dataclasses.fields(cls)]

        @functools.wraps(func)
        def command(**kwargs):
            built, problems = {}, []
            for name, cls in groups.items():
                values = {f.name: _from_cli(f, kwargs.pop(f.name)) for f in dataclasses.fields(cls)}
                built[name] = cls(**values)
                problems += [_flag(p.split(":", 1)[0]) + ":" + p.split(":", 1)[1] for p in built[name].problems()]
            if problems:
                _fail("; ".join(problems))
            return func(**kwargs, **built)

        command.__signature__ = base.replace(parameters=fixed + extra)
        return command
    return wrap


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(spec: JobSpec, exit_at_end: bool = True) -> int:
    """Run one job; returns its exit status (0, 1 failed shards, 75 output busy, 128 + signal when stopped)
    or exits with it."""
    use_token_auth(spec.runner.address)  # before Ray is imported: it reads RAY_AUTH_MODE then
    from .runner import JobConflict, OutputBusy, run_job, signal_of  # imports Ray: only once arguments are good

    try:
        spec.validate()
    except ValueError as exc:
        _fail(str(exc))
    try:
        result = run_job(spec)
    except OutputBusy as exc:
        _fail(str(exc), code=EXIT_BUSY)
    except (JobConflict, ConnectionError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:  # the job could not start on the cluster, or Ray failed under it
        _fail(str(exc), code=1)
    except KeyboardInterrupt as exc:  # stopped before the work began
        typer.echo("interrupted: rerun the same command to resume", err=True)
        raise typer.Exit(128 + signal_of(exc))
    typer.echo(result.summary())
    for warning in result.warnings():
        typer.echo(warning, err=True)
    if exit_at_end and result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.exit_code


@app.command()
@with_options(options=ClassifyOptions, runner=RunnerSettings)
def classify(model: Model, input: Input, output: Output, text_column: TextColumn = "text",
             overwrite: Overwrite = False, *, options: ClassifyOptions, runner: RunnerSettings) -> None:
    """Classify every row: label, score and probs (or labels / score for multi-label and regression models)."""
    _run(JobSpec("classify", str(model), input, output, text_column, options, runner, overwrite=overwrite))


@app.command()
@with_options(options=GenerateOptions, runner=RunnerSettings)
def generate(model: Model, input: Input, output: Output, text_column: TextColumn = "text",
             overwrite: Overwrite = False, *, options: GenerateOptions, runner: RunnerSettings) -> None:
    """Generate a completion for every row: completion, finish_reason, prompt_tokens, completion_tokens."""
    _run(JobSpec("generate", str(model), input, output, text_column, options, runner, overwrite=overwrite))


@app.command()
@with_options(options=EmbedOptions, runner=RunnerSettings)
def embed(model: Model, input: Input, output: Output, text_column: TextColumn = "text",
          overwrite: Overwrite = False, *, options: EmbedOptions, runner: RunnerSettings) -> None:
    """Embed every row: `embedding`, the final hidden state pooled at the last real token (or the mean)."""
    _run(JobSpec("embed", str(model), input, output, text_column, options, runner, overwrite=overwrite))


@app.command("train-head")
@with_options(options=ModelOptions, runner=RunnerSettings)
def train_head(
    model: Model,
    input: Input,
    label_column: Annotated[str, typer.Option(help="Column holding each row's label (strings, integers or "
                                                   "booleans; lists of them with --multi-label).")],
    output: Annotated[Path, typer.Option("--output", help="Directory for the new classifier checkpoint.")],
    text_column: TextColumn = "text",
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Fraction of each label's rows held out to "
                                                                   "measure the head.")] = 0.1,
    multi_label: Annotated[bool, typer.Option("--multi-label", help="Rows carry lists of labels: one sigmoid "
                                                                     "per label.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split.")] = 0,
    features: Annotated[Optional[str], typer.Option(help="Where the rows' features are computed and kept "
                                                         "(default: the user cache; required on a cluster).")] = None,
    penalty: Annotated[Optional[float], typer.Option(min=0.0, help="L2 penalty (default: chosen on a "
                                                                     "validation part).")] = None,
    *, options: ModelOptions, runner: RunnerSettings,
) -> None:
    """Train a classifier head on a base checkpoint's frozen features of labeled rows; write a new
    PersimmonForSequenceClassification checkpoint (the base's weights linked, not copied)."""
    from .lease import OutputBusy
    from .train_head import FeatureJobUnfinished, TrainHeadError, TrainHeadSpec, train_head as run_train_head

    spec = TrainHeadSpec(str(model), input, label_column, str(output), text_column, holdout, multi_label, seed,
                         features, penalty, options, runner)
    try:
        run_train_head(spec, lambda embed: _run(embed, exit_at_end=False), typer.echo)
    except (TrainHeadError, FileNotFoundError) as exc:
        _fail(str(exc))
    except FeatureJobUnfinished as exc:
        _fail(str(exc), code=exc.code)
    except OutputBusy as exc:
        _fail(str(exc), code=EXIT_BUSY)
    except KeyboardInterrupt:  # while fitting or writing: the features are kept, the output is untouched
        _fail("interrupted: rerun the same command (the features computed so far are kept)", code=130)


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
        spec = job_spec(raw, day, overwrite, folder=job.parent)
        if address is not None:
            spec.runner.address = address
        try:  # a date that is refused (no input yet, output busy) does not stop the other dates
            code = _run(spec, exit_at_end=False)
        except typer.Exit as exc:
            code = exc.exit_code
        worst = max(worst, code)
        if code >= 128:  # stopped by a signal: the remaining dates are not started
            break
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
    total = len(shards) - counts["input_removed"]
    typer.echo(f"shards: {counts['done']} done, {counts['failed']} failed, {counts['pending']} left, of {total}")
    typer.echo(f"rows: {rows} written, {errors} with errors")
    for name, entry in sorted(shards.items()):
        if entry.get("state") == "failed":
            typer.echo(f"failed: {name}: {entry.get('error')}")
        elif entry.get("state") == "input_removed":
            typer.echo(f"input removed: {name} (its output is kept; rerun with --overwrite to remove it)")
    from .lease import OutputLease

    holder = OutputLease(fs, base, output).holder_now()
    if holder:
        typer.echo(f"running now: {holder}")
    typer.echo("complete" if counts["done"] == total else "incomplete: rerun the job to finish it")


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
