"""Job files: a scheduled job as TOML, validated whole before anything runs.

Every problem is reported at once, each with its key (`options.max_length: expected an integer, got "2k"`).
Paths may carry `{date}` / `{ds}` (YYYY-MM-DD) and `{ds_nodash}` (YYYYMMDD): the run's date, from --date,
else the file's `date` ("today", "yesterday" or YYYY-MM-DD), else today in UTC. Relative local paths are
relative to the job file's folder.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import pyarrow.fs as pafs
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pipelines.options import ClassifyOptions, did_you_mean
from pipelines.tasks import TASK_OPTIONS

from .errors import UsageError
from .inputs.formats import format_problem
from .spec import DRIFT_THRESHOLD, JobSpec, RunnerSettings, delimiter_problem, model_folder_problems, task_problem

TOP = {"name": str, "task": str, "model": str, "input": str, "output": str, "text_column": str, "date": str,
       "options": dict, "runner": dict, "input_format": str, "csv_delimiter": str, "drift_threshold": (int, float)}
REQUIRED = ("name", "task", "model", "input", "output")
PLACEHOLDERS = re.compile(r"\{([^{}]*)\}")
KNOWN_PLACEHOLDERS = {"date", "ds", "ds_nodash"}
DRIFT_LOOKBACK = 31  # days back a run looks for the previous finished date to compare its results with
NAME = re.compile(r"[A-Za-z0-9._-]+")  # job names land in cron lines, unit names and submission ids


class JobFileError(UsageError):
    """A job file with problems; `problems` lists each, prefixed by its key."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))


def _check_type(key: str, value: Any, kind, problems: list[str]) -> bool:
    if not isinstance(value, kind) or (kind == (int, float) and isinstance(value, bool)):
        names = {str: "a string", dict: "a table", (int, float): "a number"}
        problems.append(f"{key}: expected {names[kind]}, got {value!r}")
        return False
    return True


def parse_date(value: str, key: str = "date") -> dt.date:
    today = dt.datetime.now(dt.timezone.utc).date()
    if value == "today":
        return today
    if value == "yesterday":
        return today - dt.timedelta(days=1)
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{key}: expected YYYY-MM-DD, 'today' or 'yesterday', got {value!r}") from None


def read_job_file(path: str | Path, check_model: bool = True) -> dict[str, Any]:
    """The TOML as a dict, with every problem (syntax, keys, types, values, model directory) reported at once.
    check_model False skips the model directory, for files run elsewhere (a cluster's own disks)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobFileError(str(path), ["file does not exist"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(str(path), [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    for key in sorted(set(raw) - set(TOP)):
        problems.append(f"{key}: unknown key{did_you_mean(key, TOP)}; known keys are {sorted(TOP)}")
    for key in REQUIRED:
        if key not in raw:
            problems.append(f"{key}: missing")
    for key, kind in TOP.items():
        if key in raw:
            _check_type(key, raw[key], kind, problems)
    if isinstance(raw.get("name"), str) and not NAME.fullmatch(raw["name"]):
        problems.append(f"name: only letters, digits and . _ - (A-Za-z0-9._-), got {raw['name']!r}: a job name "
                        "goes into schedule recipes and job ids")
    task, delimiter = raw.get("task"), raw.get("csv_delimiter")
    problems += [p for p in (format_problem(raw.get("input_format")),
                             delimiter_problem(delimiter) if isinstance(delimiter, str) else None,
                             task_problem(task) if isinstance(task, str) else None) if p]
    kind = TASK_OPTIONS.get(task, ClassifyOptions) if isinstance(task, str) else ClassifyOptions
    options = raw.get("options", {}) if isinstance(raw.get("options", {}), dict) else {}
    options = file_options(options, path.parent)
    problems += kind.from_mapping(options, "options.", f"unknown option for task {task!r}")[1]
    runner = raw.get("runner", {}) if isinstance(raw.get("runner", {}), dict) else {}
    problems += RunnerSettings.from_mapping(runner, "runner.")[1]
    for key in ("input", "output", "model"):
        value = raw.get(key)
        if isinstance(value, str):
            unknown = set(PLACEHOLDERS.findall(value)) - KNOWN_PLACEHOLDERS
            if unknown:
                problems.append(f"{key}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(KNOWN_PLACEHOLDERS)}")
    threshold = raw.get("drift_threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and not threshold >= 0:
        problems.append(f"drift_threshold: expected a number >= 0 (a population stability index), got {threshold!r}")
    if isinstance(raw.get("date"), str):
        try:
            parse_date(raw["date"])
        except ValueError as exc:
            problems.append(str(exc))
    model = raw.get("model")
    if check_model and isinstance(model, str) and "://" not in model and "{" not in model:
        folder = Path(local_path(model, path.parent))
        shown = model if os.path.isabs(model) and ".." not in Path(model).parts else \
            f"{model} (= {os.path.normpath(folder)}, relative to the job file)"  # where it was looked for
        problems += model_folder_problems(folder, shown)
    if problems:
        raise JobFileError(str(path), problems)
    return raw


def render(value: str, date: dt.date) -> str:
    iso = date.isoformat()
    return value.replace("{date}", iso).replace("{ds}", iso).replace("{ds_nodash}", iso.replace("-", ""))


def local_path(value: str, folder: Path | None) -> str:
    """A relative local path in a job file is relative to the file's folder, wherever `run` is started; `~` is
    the user's home."""
    if "://" in value:
        return value
    value = os.path.expanduser(value)
    if folder is None or Path(value).is_absolute():
        return value
    return str(folder / value)


def file_options(options: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """Options naming a file (json_schema, grammar), relative to the job file's folder like every path in it."""
    from pipelines.options import _inline

    out = dict(options)
    for key in ("json_schema", "grammar"):
        if isinstance(out.get(key), str) and not _inline(key, out[key]):
            out[key] = local_path(out[key], folder)
    return out


def job_spec(raw: dict[str, Any], date: dt.date, overwrite: bool = False, folder: Path | None = None) -> JobSpec:
    """The JobSpec for one date of a validated job file; `folder`: the job file's folder."""
    return JobSpec(
        task=raw["task"], model=local_path(render(raw["model"], date), folder),
        input=local_path(render(raw["input"], date), folder), output=local_path(render(raw["output"], date), folder),
        text_column=raw.get("text_column", "text"),
        options=file_options(raw.get("options", {}), folder), runner=RunnerSettings.from_mapping(raw.get("runner", {}))[0],
        name=raw["name"], overwrite=overwrite,
        date=date.isoformat(), input_format=raw.get("input_format"), csv_delimiter=raw.get("csv_delimiter"),
        drift_threshold=float(raw.get("drift_threshold", DRIFT_THRESHOLD)),
    )


def previous_output(raw: dict[str, Any], date: dt.date, folder: Path | None = None) -> str | None:
    """The output of the latest date before `date` (within DRIFT_LOOKBACK days) that finished (`_SUCCESS`):
    what a run of `date` is compared with. None when the output has no date in its path."""
    if not PLACEHOLDERS.search(raw["output"]):
        return None
    from .output.manifest import SUCCESS
    from .output.paths import join, resolve

    for back in range(1, DRIFT_LOOKBACK + 1):
        candidate = local_path(render(raw["output"], date - dt.timedelta(days=back)), folder)
        try:
            fs, base = resolve(candidate)
            if fs.get_file_info(join(base, SUCCESS)).type == pafs.FileType.File:
                return candidate
        except (OSError, ValueError):
            continue
    return None


def run_dates(raw: dict[str, Any], date: str | None = None, start: str | None = None,
              end: str | None = None) -> list[dt.date]:
    """The dates to run: a --from/--to range (inclusive), else --date, else the file's date, else today (UTC)."""
    if (start is None) != (end is None):
        raise ValueError("--from and --to go together")
    if start is not None:
        if date is not None:
            raise ValueError("give either --date or --from/--to, not both")
        first, last = parse_date(start, "--from"), parse_date(end, "--to")
        if last < first:
            raise ValueError(f"--to {last} is before --from {first}")
        return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    if date is not None:
        return [parse_date(date, "--date")]
    return [parse_date(raw.get("date", "today"))]
