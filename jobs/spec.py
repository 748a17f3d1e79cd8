"""JobSpec: one batch job as data (task, model, input, output, options, runner settings), validated up front.

The CLI builds one from its flags, `persimmon-batch run JOB.toml` from a job file; both through the same
typed options (pipelines/options.py) with the same defaults. The options that can change the output go into
the job's fingerprint, after defaults are filled in; batching, compilation and the runner settings do not.
Tasks: those of the registry (pipelines/tasks.py): classify, generate, embed, score.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persimmon.files import VOCAB_FILES
from pipelines.errors import one_line
from pipelines.options import CONSTRAINTS, ModelOptions, Options, did_you_mean, option
from pipelines.tasks import TASK_OPTIONS
from pipelines.tasks import TASKS

from .errors import UsageError

TASK_NAMES = tuple(TASKS)


# The rules a job's fields follow, each in one place: a JobSpec raises the first problem, a job file lists all.

def task_problem(task: object) -> str | None:
    if task in TASKS:
        return None
    return f"task: expected one of {list(TASK_NAMES)}, got {task!r}{did_you_mean(str(task), TASK_NAMES)}"


def delimiter_problem(delimiter: object) -> str | None:
    if delimiter is None or (isinstance(delimiter, str) and len(delimiter) == 1 and delimiter not in "\"\r\n"):
        return None
    return f"csv_delimiter must be one character (not a quote or a line end), got {delimiter!r}"


def model_folder_problems(folder: Path, shown: str) -> list[str]:
    """A local model folder's files: a config and a tokenizer (`shown`: how the folder is named to the user)."""
    if not folder.is_dir():
        return [f"model: directory {shown} does not exist"]
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(f"model: {shown} has no config.json")
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        problems.append(f"model: {shown} has no tokenizer.model")
    return problems


@dataclass
class RunnerSettings(Options):
    """How a job runs (never what it computes)."""

    actors: int | None = option(None, "Actors (default: one per GPU, else one per 4 CPUs).", min=1)
    gpus_per_actor: float = option(1.0, "GPUs per actor where the cluster has GPUs.", min=0.0)
    address: str | None = option(None, "Ray cluster: auto, HOST:PORT or ray://...; none = start Ray here.")
    max_attempts: int = option(3, "Tries per work unit whose actor died, before the unit is marked failed.", min=1)
    rows_per_unit: int = option(200_000, "Most rows in one work unit (larger shards are split, then merged in "
                                         "order into one output file).", min=1)
    batch_rows: int = option(1024, "Rows per record batch read from Parquet.", min=1)
    lease_ttl: float = option(120.0, "Seconds a lease must be seen unchanged (on the observer's clock) before "
                                     "another run may take the output over from this one.", min=1.0, max=3600.0)
    stall_timeout: float | None = option(None, "Seconds without progress after which an actor counts as stalled "
                                               "and is replaced (default: the longer of 600 s and 20x the slowest "
                                               "model batch so far).", min=1.0)
    backup_tasks: bool | None = option(None, "Start a second attempt of a unit running far longer than its peers "
                                             "once the queue is empty (the first to finish is kept; default: on "
                                             "for a cluster of several nodes).")
    placement_timeout: float = option(300.0, "Seconds an actor may wait to be placed on the cluster (e.g. for a "
                                             "GPU node to join) before the run gives up on it.", min=1.0)


def _tokenizer_identity(model: Path) -> tuple[str, tuple[int, ...]]:
    """The model folder and the identity (device, inode, size, modification time) of what its vocabulary is
    built from: the tokenizer file and config.json (its special token ids)."""
    identity: tuple[int, ...] = ()
    for name in (*VOCAB_FILES, "config.json"):
        try:
            st = (model / name).stat()
        except OSError:
            continue
        identity += (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return str(model), identity


@functools.lru_cache(maxsize=4)
def _vocabulary(model: str, identity: tuple[int, ...], vocab_size: int):
    """The model's vocabulary for the constraint probe, built once per tokenizer and config file in a process
    (a backfill resolves a job per date; building one reads every piece: about 1 s for Persimmon-8B's 262k)."""
    from persimmon.grammar import vocabulary_for
    from persimmon.tokenizer import PersimmonTokenizer

    return vocabulary_for(PersimmonTokenizer.from_pretrained(model), vocab_size)


# the population stability index past which a result counts as drifted from the run compared with: under 0.1
# is stable, 0.1-0.2 a shift worth a look, past 0.2 a real one (jobs/report/drift.py)
DRIFT_THRESHOLD = 0.2


@dataclass
class JobSpec:
    task: str
    model: str
    input: str
    output: str
    text_column: str = "text"
    options: ModelOptions | dict[str, Any] | None = None  # a dict is read into the task's options
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    name: str | None = None
    overwrite: bool = False
    date: str | None = None  # the run's date, for jobs from a job file
    input_format: str | None = None  # parquet | csv | jsonl (None: by each file's suffix); openai-batch: its own
    only_where: str | None = None  # rows whose value in this column is null skip the model (train-head's labels)
    csv_delimiter: str | None = None  # CSV inputs' field delimiter (None: a comma)
    # a job file's run: the output of its previous date, whose results a complete run is compared with (drift)
    compare_with: str | None = None
    drift_threshold: float = DRIFT_THRESHOLD

    def __post_init__(self) -> None:
        self.model, self.input, self.output = (p if "://" in p else os.path.expanduser(p)
                                               for p in (str(self.model), str(self.input), str(self.output)))
        problem = task_problem(self.task)
        if problem:
            raise UsageError(problem)
        from .inputs.formats import REQUESTS, check_format

        if TASKS[self.task].requests:
            self.input_format = REQUESTS
        else:
            self.input_format = check_format(self.input_format)
        problem = delimiter_problem(self.csv_delimiter)
        if problem:
            raise UsageError(problem)
        kind = TASK_OPTIONS[self.task]
        if self.options is None:
            self.options = kind()
        elif isinstance(self.options, dict):
            options, problems = kind.from_mapping(self.options)
            if problems:
                raise UsageError("; ".join(problems))
            self.options = options
        elif not isinstance(self.options, kind):
            raise TypeError(f"a {self.task} job takes {kind.__name__}, got {type(self.options).__name__}")
        if hasattr(self.options, "resolved"):  # schema and grammar files read here, on the driver
            self.options = self.options.resolved()

    def validate(self) -> None:
        """Raise ValueError listing every problem found, before anything starts."""
        problems = self.options.problems() + self.runner.problems()
        if "://" not in self.model:
            found = model_folder_problems(Path(self.model), self.model)
            problems += found or self._model_problems(Path(self.model))
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def wants_lm(self) -> bool:
        """Whether the task runs a causal LM (generation, scoring, zero-shot classification); classification
        runs a classifier, embedding the base model of either."""
        return TASKS[self.task].needs_lm(self.options)

    def _model_problems(self, model: Path) -> list[str]:
        """Say before any actor tries to load the wrong head, a config that does not fit its weights, or a
        generation longer than the model's window."""
        from persimmon.config import PersimmonConfig
        from persimmon.files import CheckpointError, check_config_fits, checkpoint_heads

        try:
            config = PersimmonConfig.from_pretrained(model)
            check_config_fits(config, model)
            heads = checkpoint_heads(model)
            tied = config.tie_word_embeddings
        except (CheckpointError, ValueError, OSError) as exc:
            return [f"{model / 'config.json'}: {exc}" if "config field" in str(exc) else str(exc)]
        new = getattr(self.options, "max_new_tokens", None)
        if new is not None and new >= config.max_position_embeddings:
            return [f"max_new_tokens: {new} does not fit the model's window of {config.max_position_embeddings} "
                    "tokens (prompt and completion together); give fewer"]
        if self.wants_lm and "lm_head" not in heads and not tied:
            use = "zero-shot classification (--candidate-labels)" if self.task == "classify" else self.task
            return [f"{use} needs a causal LM, but {model} is a sequence classifier (it has score.weight, "
                    "no lm_head.weight)"]
        if self.task == "classify" and not self.wants_lm and "score" not in heads:
            return [f"classification needs a PersimmonForSequenceClassification checkpoint, but {model} has no "
                    "score.weight; for a causal LM give --candidate-labels (zero-shot)"]
        return self._template_problems(model, config) + self._grammar_problems(model, config)

    def _template_problems(self, model: Path, config) -> list[str]:
        """A prompt template whose own tokens leave no room for text in the window: said here, as every
        actor's load would fail on it (and a failed first run would leave its options behind in the output)."""
        template = getattr(self.options, "prompt_template", None)
        if self.task not in ("generate", "score") or not template:
            return []
        from persimmon.tokenizer import PersimmonTokenizer
        from pipelines.prompts import PromptTemplate

        try:
            limit = self.options.prompt_limit(config.max_position_embeddings)
            PromptTemplate(template).check_fits(PersimmonTokenizer.from_pretrained(model), limit)
        except ValueError as exc:
            return [f"prompt_template: {exc}"]
        return []

    def _grammar_problems(self, model: Path, config) -> list[str]:
        """A constraint compiled against the model's own vocabulary, as every actor would compile it: what only
        the tokens show (a grammar nested past llguidance's limits, too many choices, a token the vocabulary
        lacks) is refused here, not in every shard after Ray starts."""
        constraint = getattr(self.options, "constraint", None)
        if constraint is None:
            return []
        from persimmon.grammar import GrammarError

        try:
            grammar = constraint()
        except (ValueError, OSError):  # not JSON, or a file gone: options.problems() says so
            return []
        if grammar is None:
            return []
        try:
            _vocabulary(*_tokenizer_identity(model), config.vocab_size).probe(grammar)
        except GrammarError as exc:
            name = next(n for n in CONSTRAINTS if getattr(self.options, n, None))
            return [f"{name}: {one_line(exc, 500)}"]
        return []

    def fingerprint(self, model_checksum: str, model_dtype: str, config=None) -> str:
        """What determines the output: task, model content, text column, and the options that can change it,
        defaults filled in; dtype "auto" counts as the checkpoint's own dtype (`model_dtype`). With the
        model's config, values that change nothing for this model count as their defaults too: a max_length
        at or past the model's window, a threshold for a model that is not multi-label."""
        options = self.options.identity()
        if options.get("dtype") == "auto":
            options["dtype"] = model_dtype
        if config is not None:
            if not (self.task == "classify" and self.wants_lm):  # zero-shot also subtracts its labels' tokens
                room = self.options.room(config.max_position_embeddings)
                if options.get("max_length") is not None and options["max_length"] >= room:
                    options["max_length"] = None
            if self.task == "classify" and not self.wants_lm:
                from persimmon.config import ProblemType
                from pipelines.schema import classification_kind

                if classification_kind(config) != ProblemType.MULTI_LABEL:
                    options.pop("threshold", None)
        what = {"task": self.task, "model": model_checksum, "text_column": self.text_column, "options": options}
        for key in ("input_format", "only_where", "csv_delimiter"):  # only where given: earlier jobs' fingerprints stay as they were
            if getattr(self, key) is not None:
                what[key] = getattr(self, key)
        payload = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "input": self.input, "output": self.output,
                "text_column": self.text_column, "options": self.options.as_dict(),
                "runner": self.runner.as_dict(), "name": self.name, "overwrite": self.overwrite, "date": self.date,
                "input_format": self.input_format, "only_where": self.only_where, "csv_delimiter": self.csv_delimiter}
