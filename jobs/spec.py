"""JobSpec: one batch job as data (task, model, input, output, options, runner settings), validated up front.

The CLI builds one from its flags; `persimmon-batch run JOB.toml` (next issue) will build one from a file.
The options that change outputs go into the job's fingerprint; runner settings (actors, address) do not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("classify", "generate")
DTYPES = ("auto", "float32", "bfloat16", "float16")

CLASSIFY_OPTIONS = {"dtype", "max_length", "batch_tokens", "candidate_labels", "truncation_side", "threshold",
                    "prompt_template"}
GENERATE_OPTIONS = {"dtype", "max_length", "batch_tokens", "prompt_template", "max_new_tokens", "temperature",
                    "top_k", "top_p", "seed", "stop", "truncation_side", "compile"}


@dataclass
class RunnerSettings:
    actors: int | None = None  # None: one per GPU, or one CPU actor per 4 cores (at least one)
    gpus_per_actor: float = 1.0
    address: str | None = None  # None: start Ray on this machine
    max_attempts: int = 3  # tries per work unit before it is marked failed
    rows_per_unit: int = 200_000  # shards with more rows are split into row-group slices
    batch_rows: int = 1024  # rows per record batch read from Parquet (the window an actor holds)


@dataclass
class JobSpec:
    task: str
    model: str
    input: str
    output: str
    text_column: str = "text"
    options: dict[str, Any] = field(default_factory=dict)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    name: str | None = None
    overwrite: bool = False
    date: str | None = None  # the run's date, for jobs from a job file

    def validate(self) -> None:
        """Raise ValueError listing every problem found, before anything starts."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        allowed = CLASSIFY_OPTIONS if self.task == "classify" else GENERATE_OPTIONS
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            problems.append(f"unknown {self.task} option(s) {unknown}; known: {sorted(allowed)}")
        if self.options.get("dtype", "auto") not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.options['dtype']!r}")
        model = Path(self.model)
        if "://" not in self.model:
            if not model.is_dir():
                problems.append(f"model directory {self.model} does not exist")
            else:
                has_config = (model / "config.json").is_file()
                has_tokenizer = any((model / n).is_file() for n in ("tokenizer.model", "adept_vocab.model"))
                if not has_config:
                    problems.append(f"model directory {self.model} has no config.json")
                if not has_tokenizer:
                    problems.append(f"model directory {self.model} has no tokenizer.model")
                if has_config and has_tokenizer:
                    problems += self._head_problems(model)
        r = self.runner
        if r.actors is not None and r.actors < 1:
            problems.append(f"actors must be at least 1, got {r.actors}")
        if r.gpus_per_actor < 0:
            problems.append(f"gpus_per_actor must be >= 0, got {r.gpus_per_actor}")
        for name in ("max_attempts", "rows_per_unit", "batch_rows"):
            if getattr(r, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(r, name)}")
        if problems:
            raise ValueError("; ".join(problems))

    def _head_problems(self, model: Path) -> list[str]:
        """Generation and zero-shot need a causal LM's head, classification a classifier's: say so before
        any actor tries to load the wrong one."""
        from persimmon.checkpoint import CheckpointError, checkpoint_heads
        from persimmon.config import PersimmonConfig

        try:
            heads = checkpoint_heads(model)
            tied = PersimmonConfig.from_pretrained(model).tie_word_embeddings
        except (CheckpointError, ValueError, OSError) as exc:
            return [str(exc)]
        wants_lm = self.task == "generate" or bool(self.options.get("candidate_labels"))
        if wants_lm and "lm_head" not in heads and not tied:
            use = "generate" if self.task == "generate" else "zero-shot classification (--candidate-labels)"
            return [f"{use} needs a causal LM, but {model} is a sequence classifier (it has score.weight, "
                    "no lm_head.weight)"]
        if not wants_lm and "score" not in heads:
            return [f"classification needs a PersimmonForSequenceClassification checkpoint, but {model} has no "
                    "score.weight; for a causal LM give --candidate-labels (zero-shot)"]
        return []

    def fingerprint(self, model_checksum: str) -> str:
        """What determines the output: task, model content, text column, options (not the runner settings)."""
        payload = json.dumps({"task": self.task, "model": model_checksum, "text_column": self.text_column,
                              "options": self.options}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_checksum(model_dir: str | Path) -> str:
    """A checksum of a checkpoint directory that changes when its config, tokenizer or weights change:
    config and tokenizer whole; each weight file's name, size and first and last MiB (reading 16 GB of
    weights on every run would cost more than it could catch)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.iterdir() if p.is_file()):
        if file.name.startswith("."):
            continue
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with file.open("rb") as f:
            if file.suffix in (".json", ".model") or size <= 2 << 20:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()[:16]
