"""persimmon-batch: the command line. It parses and validates, builds a JobSpec and calls one function.

Every command ends in one `error:` line for any exception, with the exit status of jobs/errors.py (the
traceback only under --debug): usage errors of the parser included.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from pipelines.errors import one_line
from pipelines.options import ModelOptions, Options, _value_type, default_of
from pipelines.tasks import TASKS

from .errors import (EXIT_BUSY, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_SIGNALED, EXIT_UNAVAILABLE, EXIT_USAGE,
                     BatchError, ClusterFailed, ShardState, UsageError, exit_for_signal)
from .execution.cluster_auth import use_token_auth
from .inputs.formats import TABULAR
from .execution.signals import signal_of
from .spec import DRIFT_THRESHOLD, JobSpec, RunnerSettings

DEBUG = {"on": bool(os.environ.get("PERSIMMON_BATCH_DEBUG"))}


def _parser_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, "no arguments: show help", exits) of the parser: typer >= 0.20 carries its own copy of
    click, older ones use click itself."""
    import click.exceptions as plain

    kinds = [plain]
    try:
        from typer._click import exceptions as vendored

        kinds.append(vendored)
    except ImportError:
        pass
    usage = tuple(k.ClickException for k in kinds)
    no_args = tuple(k.NoArgsIsHelpError for k in kinds if hasattr(k, "NoArgsIsHelpError"))
    exits = (typer.Exit, plain.Exit, typer.Abort, plain.Abort)
    return usage, no_args, exits


PARSER_ERRORS, NO_ARGS, EXITS = _parser_errors()


def _tidy(command):
    """Help that reads like a command's, not like Python's types: flags show no `<bool>`, repeatable options
    `TEXT`, arguments their name in capitals (`JOB`, not `{job}`)."""
    if getattr(command, "_tidied", False):
        return command
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "multiple", False):
            param.metavar = "TEXT"
        elif param.param_type_name == "argument":
            shown = param.name.upper()
            param.metavar = shown
            param._usage_display_name = (lambda shown=shown, required=param.required:
                                         shown if required else f"[{shown}]")
    make_help = command.get_help_option

    def help_option(ctx):
        option = make_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    command._tidied = True
    return command


class _Group(TyperGroup):
    """The parser's own errors (a missing option, a bad value) as one `error:` line, like every other error."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        return _tidy(command) if command is not None else None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _tidy(self)  # the top-level help too: `--debug`, not `--debug <bool>`
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS as exc:
            typer.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) else str(exc))
            code = EXIT_OK
        except PARSER_ERRORS as exc:
            where = f" (see: {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) else ""
            typer.echo(f"error: {one_line(exc.format_message())}{where}", err=True)
            code = exc.exit_code
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("error: aborted", err=True)
            code = exit_for_signal(signal.SIGINT)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # click's plain help: it wraps at any width, never cutting a flag name
                  help="Run the Persimmon language model over Parquet datasets on Ray.")


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (also: "
                                                                   "PERSIMMON_BATCH_DEBUG=1).")] = False) -> None:
    """Run the Persimmon language model over Parquet datasets on Ray."""
    DEBUG["on"] = DEBUG["on"] or debug


def _report(exc: BaseException) -> int:
    """The exit status for an exception, after its one `error:` line (and a failed run's summary)."""
    from .errors import Interrupted

    result = getattr(exc, "result", None)
    if result is not None:
        typer.echo(result.summary())
    stopped = isinstance(exc, Interrupted) or (isinstance(exc, KeyboardInterrupt) and not isinstance(exc, BatchError))
    if stopped and not (result is not None and result.interrupted):  # else the summary's last line says it
        typer.echo("interrupted: rerun the same command to resume", err=True)
    if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, BatchError):
        return exit_for_signal(signal_of(exc))
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, BatchError):
        message = str(exc) if "\n  " in str(exc) else one_line(exc)  # a job file's problems: one per line
        typer.echo(f"error: {message}", err=True)
        return exc.exit_code
    name = type(exc).__name__
    if name == "AuthenticationError":  # ray.exceptions: a cluster that wants a token this client lacks
        typer.echo(f"error: the cluster refused this client: {one_line(exc, 300)} (set RAY_AUTH_TOKEN to the head "
                   "node's token, or copy its ~/.ray/auth_token here)", err=True)
        return EXIT_USAGE
    typer.echo(f"error: {name}: {one_line(exc, 500)} (an unexpected error: --debug shows where)", err=True)
    return EXIT_FAILED


def _handled(func):
    """A command whose every exception ends in one `error:` line and its exit status."""
    @functools.wraps(func)
    def command(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EXITS + PARSER_ERRORS:
            raise
        except BaseException as exc:  # noqa: B902 - the point: nothing reaches the user as a traceback
            if DEBUG["on"] or isinstance(exc, SystemExit):
                raise
            code = _report(exc)
            if isinstance(exc, ClusterFailed) and DEBUG.get("program"):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # Ray's own exit hooks would wait for the dead cluster
            raise typer.Exit(code) from None

    return command


def command(*args, **kwargs):
    """app.command with the one error handler."""
    def register(func):
        return app.command(*args, **kwargs)(_handled(func))
    return register


Model = Annotated[Path, typer.Option("--model", help="Checkpoint directory (config.json, safetensors, tokenizer.model).",
                                     exists=True, file_okay=False, resolve_path=True)]
Input = Annotated[str, typer.Option("--input", help="Parquet, CSV or JSON Lines file, directory or glob; local or a URI "
                                                   "(s3://, gs://, hdfs://).")]
Output = Annotated[str, typer.Option("--output", help="Output directory (local or URI): one file per input shard.")]
TextColumn = Annotated[str, typer.Option(help="Column holding the text.")]
Overwrite = Annotated[bool, typer.Option(help="Replace this tool's outputs of a different model or options, and "
                                              "remove the outputs of shards gone from the input.")]


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
        names = [*map(str, meta["choices"]), *meta.get("aliases", {})]
        kind = enum.Enum(f.name.title().replace("_", ""), {c: c for c in names}, type=str)
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
                raise UsageError("; ".join(problems))
            return func(**kwargs, **built)

        command.__signature__ = base.replace(parameters=fixed + extra)
        return command
    return wrap


def _run(spec: JobSpec, exit_at_end: bool = True) -> int:
    """Run one job; returns its exit status (0, 1 failed shards, 75 output busy, 128 + signal when stopped)
    or exits with it. A job refused or failed under way raises its BatchError (the handler reports it)."""
    use_token_auth(spec.runner.address)  # before Ray is imported: it reads RAY_AUTH_MODE then
    from .execution.signals import StopSignals
    from .planning.resolve import resolve_job

    with StopSignals():  # a SIGTERM while the checks run (a first model checksum takes minutes) stops like Ctrl-C
        job = resolve_job(spec)  # every check, once, before Ray is imported
    from .runner import run_job

    result = run_job(job)
    typer.echo(result.summary())
    for warning in result.warnings():
        typer.echo(warning, err=True)
    if result.lost:
        typer.echo(f"error: {one_line(result.lost)}: this run stopped; what it committed is kept", err=True)
    elif result.failed and not result.interrupted:
        typer.echo(f"error: {result.failed} of {result.shards} shards failed (the `failed:` lines say why); the "
                   "others are committed: fix those and rerun", err=True)
    elif result.left and not result.interrupted:
        typer.echo(f"error: {result.left} of {result.shards} shards were left unprocessed; the others are "
                   "committed: rerun the same command to finish", err=True)
    if exit_at_end and result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.exit_code


# typer's choices for --input-format: the tabular formats, by value
InputFormat = enum.Enum("InputFormat", {f.value: f.value for f in TABULAR}, type=str)


InputFormatOption = Annotated[Optional[InputFormat], typer.Option(
    "--input-format", help="Read every input file as this format (default: by suffix: .parquet, .csv, "
                           ".jsonl/.ndjson; other names given as a file are Parquet).")]
CsvDelimiter = Annotated[Optional[str], typer.Option(
    "--csv-delimiter", help="CSV inputs' field delimiter, one character (default: a comma; \\t for a tab).")]
Requests = Annotated[str, typer.Option("--input", help="OpenAI batch file (.jsonl) or a folder or glob of them; "
                                                        "local or a URI.")]


def _task_command(task) -> None:
    """The command of a registered task (pipelines/tasks.py): its options' flags, the runner's, one job."""
    if task.requests:
        def run_task(model: Model, input: Requests, output: Output, overwrite: Overwrite = False, *, options,
                     runner) -> None:
            _run(JobSpec(task.name, str(model), input, output, "text", options, runner, overwrite=overwrite))
    else:
        def run_task(model: Model, input: Input, output: Output, text_column: TextColumn = "text",
                     input_format: InputFormatOption = None, csv_delimiter: CsvDelimiter = None,
                     overwrite: Overwrite = False, *, options, runner) -> None:
            delimiter = "\t" if csv_delimiter in ("\\t", "tab") else csv_delimiter
            _run(JobSpec(task.name, str(model), input, output, text_column, options, runner, overwrite=overwrite,
                         input_format=input_format.value if input_format else None, csv_delimiter=delimiter))

    run_task.__name__ = run_task.__qualname__ = task.name
    run_task.__doc__ = task.summary
    command(task.name)(with_options(options=task.options, runner=RunnerSettings)(run_task))


for _task in TASKS.values():
    _task_command(_task)


@command("train-head")
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
    from .train_head import TrainHeadSpec, train_head as run_train_head

    spec = TrainHeadSpec(str(model), input, label_column, str(output), text_column, holdout, multi_label, seed,
                         features, penalty, options, runner)
    try:
        run_train_head(spec, lambda embed: _run(embed, exit_at_end=False), typer.echo)
    except KeyboardInterrupt as exc:  # while fitting or writing: the features are kept, the output is untouched
        typer.echo("interrupted: rerun the same command (the features computed so far are kept)", err=True)
        raise typer.Exit(exit_for_signal(signal_of(exc))) from None


JobFile = Annotated[Path, typer.Argument(help="A job file (TOML).", exists=True, dir_okay=False, resolve_path=True)]


def _read(job: Path, check_model: bool = True) -> dict:
    from .jobfile import read_job_file

    return read_job_file(job, check_model)


@command()
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
    from .jobfile import job_spec, previous_output, run_dates

    raw = _read(job)
    try:
        dates = run_dates(raw, date, start, end)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    worst, outcomes = 0, []
    for day in dates:
        typer.echo(f"== {raw['name']} for {day}")
        spec = job_spec(raw, day, overwrite, folder=job.parent)
        spec.compare_with = previous_output(raw, day, folder=job.parent)  # its results are compared with these
        if address is not None:
            spec.runner.address = address
        try:  # a date that is refused (no input yet, output busy) does not stop the other dates
            code = _run(spec, exit_at_end=False)
        except BatchError as exc:
            if isinstance(exc, ClusterFailed) or isinstance(exc, KeyboardInterrupt):
                raise
            code = _report(exc)
        worst = max(worst, code)
        outcomes.append((day, code))
        if code >= EXIT_SIGNALED:  # stopped by a signal: the remaining dates are not started
            break
    if len(dates) > 1:  # a backfill: one line per date, after each date's own report
        done = sum(code == 0 for _, code in outcomes)
        typer.echo(f"== {raw['name']}: {done} of {len(dates)} dates done")
        for day, code in outcomes:
            typer.echo(f"  {day}: {DATE_OUTCOMES.get(code, 'stopped' if code >= EXIT_SIGNALED else f'exit {code}')} (exit {code})")
        for day in dates[len(outcomes):]:
            typer.echo(f"  {day}: not started")
    if worst:
        raise typer.Exit(worst)


DATE_OUTCOMES = {EXIT_OK: "done", EXIT_FAILED: "shards failed", EXIT_USAGE: "refused", EXIT_INCOMPLETE: "incomplete",
                 EXIT_UNAVAILABLE: "cluster unavailable", EXIT_BUSY: "output busy"}


@command()
def validate(job: JobFile) -> None:
    """Check a job file (keys, types, values, model directory) without running anything."""
    raw = _read(job)
    typer.echo(f"{job}: valid {raw['task']} job {raw['name']!r}")


@command()
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
        raise UsageError(str(exc)) from None
    use_token_auth(address)
    from .execution.submit import AlreadySubmitted, follow_job, submit_job

    try:
        sid = submit_job(job.read_text(), raw["name"], day, address)
    except AlreadySubmitted:
        raise
    except (ConnectionError, RuntimeError) as exc:
        raise UsageError(f"cannot submit to {address}: {one_line(exc)}") from None
    typer.echo(f"submitted {sid}")
    if wait and not follow_job(sid, address):
        raise typer.Exit(EXIT_FAILED)


class ScheduleFormat(str, enum.Enum):
    cron = "cron"
    systemd = "systemd"
    k8s = "k8s"


@command()
def schedule(
    job: JobFile,
    format: Annotated[ScheduleFormat, typer.Option(help="cron line, systemd service + timer, or Kubernetes CronJob.")] = ScheduleFormat.cron,
    at: Annotated[str, typer.Option(help="Time of day, HH:MM UTC.")] = "02:00",
    image: Annotated[str, typer.Option(help="Container image (k8s).")] = "persimmon-batch:latest",
) -> None:
    """Print a daily schedule for a job file."""
    from .schedule import k8s_warnings, render

    raw = _read(job)
    warnings = k8s_warnings(raw) if format == ScheduleFormat.k8s else []
    for warning in warnings:  # in the recipe's comments too: whoever installs it sees them
        typer.echo(f"WARNING: {warning}", err=True)
    try:
        typer.echo(render(job, raw["name"], format.value, at=at, image=image, warnings=warnings), nl=False)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@command()
def status(output: Annotated[str, typer.Argument(help="A job's output directory.")]) -> None:
    """What is done, what is left, what failed, with row counts. Exit status: 0 complete, 1 shards failed,
    3 incomplete (shards left to do), 2 no job's output there."""
    from .output.paths import resolve
    from .output.lease import OutputLease
    from .output.manifest import Manifest
    from .planning.plan import missing_outputs

    fs, base = resolve(output)
    manifest = Manifest.load(fs, base)
    if manifest is None:
        raise UsageError(f"no manifest in {output}: no job has written there")
    counts = manifest.counts()
    shards = manifest.shards
    done = [s for s in shards.values() if s.get("state") == ShardState.DONE.value]
    rows = sum(s.get("rows", 0) for s in done)
    errors = sum(s.get("errors", 0) for s in done)
    spec = manifest.data.get("spec", {}) if isinstance(manifest.data.get("spec"), dict) else {}
    model = manifest.data.get("model") if isinstance(manifest.data.get("model"), dict) else {}
    typer.echo(f"job: {spec.get('task')} with {model.get('path')} (fingerprint {manifest.data.get('fingerprint')})")
    total = len(shards) - counts[ShardState.INPUT_REMOVED.value]
    typer.echo(f"shards: {counts['done']} done, {counts['failed']} failed, {counts['pending']} left, of {total}")
    typer.echo(f"rows: {rows} written, {errors} with errors")
    for name, entry in sorted(shards.items()):
        if entry.get("state") == ShardState.FAILED.value:
            typer.echo(f"failed: {name}: {entry.get('error')}")
        elif entry.get("state") == ShardState.INPUT_REMOVED.value:
            typer.echo(f"input removed: {name} (its output is kept; rerun with --overwrite to remove it)")
    missing = missing_outputs(fs, base, manifest)  # one listing: what the manifest says is done is on disk
    for name, why in sorted(missing.items()):
        typer.echo(f"missing: {name}: {why} (a rerun redoes it)")
    holder = OutputLease(fs, base, output).holder_now()
    if holder:
        typer.echo(f"running now: {holder}")
    drift = manifest.data.get("drift")
    if isinstance(drift, dict):
        from .report.drift import recorded_warning

        warning = recorded_warning(drift)
        if warning:
            typer.echo(warning, err=True)
    if counts["done"] == total and not missing:
        typer.echo("complete")
        return
    typer.echo("incomplete: rerun the job to finish it")
    raise typer.Exit(EXIT_FAILED if counts["failed"] else EXIT_INCOMPLETE)


@command()
def report(
    output: Annotated[str, typer.Argument(help="A job's output directory (local or s3://).")],
    compare: Annotated[Optional[str], typer.Option(
        help="Another output of the job (last night's, say): both runs side by side, and the drift table "
             "(default: for a job file's date, the date its run was compared with).")] = None,
    page: Annotated[Path, typer.Option("--output", help="Where to write the page.")] = Path("report.html"),
    drift_threshold: Annotated[float, typer.Option(
        min=0.0, help="The population stability index past which a result counts as drifted.")] = DRIFT_THRESHOLD,
) -> None:
    """One self-contained HTML page of what a job did: what ran, rows and errors by shard, throughput per actor,
    the results (labels, scores, lengths, finish reasons), error kinds with examples, token lengths; with
    --compare, the drift from another run. Exit status: 0 written (drift or not), 2 no job's output there."""
    from .report import recorded_baseline, write_report

    recorded = recorded_baseline(output) if compare is None else None  # a job file's date: the date it was
    written, drift, note = write_report(output, page, compare or recorded, drift_threshold,  # compared with
                                        recorded=recorded is not None)
    if note:
        typer.echo(note, err=True)
    typer.echo(f"report: {written}")
    if drift is not None:
        for measure in drift.measures:
            typer.echo(f"drift: {measure.name}: {measure.base} -> {measure.new}, PSI {measure.psi:.3f}"
                       + (" (past the threshold)" if measure.flagged else ""))
        warning = drift.warning(compare or recorded)
        if warning:
            typer.echo(warning, err=True)


@command()
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
        raise UsageError(str(exc)) from None
    typer.echo(json.dumps({"converted": str(out)}))


def main() -> None:
    DEBUG["program"] = True  # the real command, not a test's in-process call: it may end the process at once
    app(prog_name="persimmon-batch")


if __name__ == "__main__":
    sys.exit(main())
