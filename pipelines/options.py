"""The task options, defined once: type, default, choices, bounds, help, and whether they change the output.

The CLI builds its flags from these dataclasses, a job file's `[options]` table is read into them, the
pipelines take them, and a job's fingerprint hashes the fields that can change its output (`identity`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persimmon.kinds import Kind

from .errors import one_line

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


class Side(Kind):
    """Which end of a too-long text truncation drops."""

    LEFT = "left"
    RIGHT = "right"


class Pooling(Kind):
    """How an embedding is taken from the final hidden states."""

    LAST = "last"  # the last real token's (what a classifier head sees)
    MEAN = "mean"  # the average over the real tokens


SIDES = tuple(Side)
CHAT_TEMPLATE = "human: {text}\n\nadept:"
ZERO_SHOT_TEMPLATE = "human: Which of these labels fits the text best: {labels}?\n\nText: {text}\n\nadept:"


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, identity: bool = True, cli: str | None = None, escapes: bool = False,
           aliases: dict[str, str] | None = None) -> Any:
    """A dataclass field carrying what the CLI, job files and fingerprints need to know about it.

    identity: False for options that cannot change the output (batching, compilation): kept out of the
    job's fingerprint. cli: "comma" when the flag takes a comma-separated list. escapes: the CLI turns a
    typed backslash-n into a newline (shells pass it literally). aliases: other names accepted for choices
    (`fp16` for float16), turned into the choice itself wherever the options are built."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "identity": identity, "cli": cli,
            "escapes": escapes, "aliases": aliases or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _value_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for hints like `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "a list of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]


def _accepts(kind: Any, value: Any) -> bool:
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class Options:
    """Behaviour shared by every options dataclass (task options and runner settings)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # an alias of a choice (fp16) is the choice itself (float16)
            aliases = f.metadata.get("aliases")
            if aliases and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, aliases.get(getattr(self, f.name), getattr(self, f.name)))

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], prefix: str = "", unknown: str = "unknown key") -> tuple[Any, list[str]]:
        """(instance or None, problems) from a mapping such as a job file's table; every problem is named by
        its key (`options.max_length: expected an integer, got '2k'`)."""
        hints = cls.hints()
        problems, good = [], {}
        known = [f.name for f in dataclasses.fields(cls)]
        for key, value in values.items():
            if key not in known:
                problems.append(f"{prefix}{key}: {unknown}{did_you_mean(key, known)}; known: {sorted(known)}")
                continue
            kind, optional = _value_type(hints[key])
            if not (_accepts(kind, value) or (optional and value is None)):
                problems.append(f"{prefix}{key}: expected {_type_name(kind)}, got {value!r}")
                continue
            good[key] = float(value) if kind is float else value
        instance = cls(**good)
        problems += [f"{prefix}{p}" for p in instance.problems()]
        return (None if problems else instance), problems

    def problems(self) -> list[str]:
        """Every value out of its choices or bounds, as `name: message`; subclasses add their own checks."""
        found = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, (list, bool, str)) and not meta.get("choices"):
                continue
            if isinstance(value, float) and not math.isfinite(value):  # a job file's nan or inf
                found.append(f"{f.name}: must be a finite number, got {value}")
                continue
            if meta.get("choices") and value not in meta["choices"]:
                found.append(f"{f.name}: expected one of {[str(c) for c in meta['choices']]}, got {value!r}")
            if meta.get("min") is not None and value < meta["min"]:
                found.append(f"{f.name}: must be at least {meta['min']}, got {value}")
            if meta.get("max") is not None and value > meta["max"]:
                found.append(f"{f.name}: must be at most {meta['max']}, got {value}")
        return found

    def check(self) -> None:
        """Raise ValueError listing every problem."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def identity(self) -> dict[str, Any]:
        """The fields that can change the output, defaults filled in: what a fingerprint hashes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity", True)}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _template_problems(template: str | None) -> list[str]:
    if template is not None and template.count("{text}") != 1:
        return [f"prompt_template: must contain {{text}} exactly once, got {template!r}"]
    return []


@dataclass
class ModelOptions(Options):
    """What every task needs to load and batch the model."""

    dtype: str = option("auto", "Model dtype; auto = the checkpoint's own (bf16 for Persimmon-8B); fp32, bf16 and "
                                "fp16 are accepted too.", choices=DTYPES, aliases=DTYPE_ALIASES)
    max_length: int | None = option(None, "Tokens per text (default: the model's window).", min=1)
    batch_tokens: int = option(16384, "Padded tokens per forward pass.", min=1, identity=False)

    # -- the window rule, in one place: a row's prompt gets max_length tokens where given, never more than the
    # model's window less what the task keeps for itself (the tokens it generates, a zero-shot label's tokens)
    def reserved_tokens(self) -> int:
        """Positions of the window the task keeps for what follows the prompt."""
        return 0

    def room(self, window: int, reserved: int | None = None) -> int:
        """The prompt tokens the window leaves (`reserved`: what the task keeps, when not reserved_tokens())."""
        return window - (self.reserved_tokens() if reserved is None else reserved)

    def prompt_limit(self, window: int, reserved: int | None = None) -> int:
        """The prompt tokens a row may have; ValueError when the task leaves none."""
        room = self.room(window, reserved)
        if room < 1:
            kept = self.reserved_tokens() if reserved is None else reserved
            raise ValueError(f"the {kept} tokens the task keeps (to generate, or its longest label) leave no room "
                             f"for a prompt in the model's window of {window} positions")
        return min(self.max_length or room, room)


@dataclass
class ClassifyOptions(ModelOptions):
    truncation_side: str = option("right", "Which end of a too-long text to drop.", choices=SIDES)
    threshold: float = option(0.5, "Multi-label: probability above which a label is given.", min=0.0, max=1.0)
    candidate_labels: list[str] | None = option(
        None, "a,b,c: zero-shot over these labels with a causal LM.", cli="comma")
    prompt_template: str | None = option(
        None, "Zero-shot prompt with {text} and {labels} (default: a question listing the labels).", escapes=True)

    def problems(self) -> list[str]:
        found = super().problems() + _template_problems(self.prompt_template)
        labels = self.candidate_labels
        if labels is not None:
            if len(labels) < 2 or not all(label.strip() for label in labels):
                found.append(f"candidate_labels: needs at least two non-empty labels, got {labels!r}")
            elif len(set(labels)) != len(labels):
                found.append(f"candidate_labels: labels must be distinct, got {labels!r}")
        elif self.prompt_template is not None:
            found.append("prompt_template: applies only to zero-shot classification, which needs candidate labels")
        return found

    @property
    def zero_shot(self) -> bool:
        return bool(self.candidate_labels)


@dataclass
class EngineOptions(ModelOptions):
    """What the tasks that generate through persimmon.engine share."""

    kv_cache_gib: float | None = option(
        None, "Memory for the KV cache, GiB (default: a quarter of what the device has free, at most 4 on a CPU); "
              "it sets how many rows decode together (up to 256).", min=1e-6, identity=False)
    compile: bool | None = option(None, "Compiled decode step (default: on for CUDA).", identity=False)

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_gib is None else int(self.kv_cache_gib * (1 << 30))


@dataclass
class GenerateOptions(EngineOptions):
    truncation_side: str = option("left", "Which end of a too-long text to drop.", choices=SIDES)
    prompt_template: str = option(CHAT_TEMPLATE, "Prompt around each text; {text} is replaced.", escapes=True)
    max_new_tokens: int = option(64, "Tokens to generate at most per row.", min=1)
    temperature: float = option(0.0, "0 = greedy.", min=0.0)
    top_k: int = option(0, "Sample from the k likeliest tokens (0 = all).", min=0)
    top_p: float = option(1.0, "Nucleus sampling mass, in (0, 1] (1 = off).", min=0.0, max=1.0)
    seed: int = option(0, "Sampling seed: a row's completion depends on (seed, prompt) only.")
    stop: list[str] = option([], "Stop string (repeatable); the completion ends before it.", escapes=True)
    json_schema: str | None = option(
        None, "JSON schema the completion must match (a file, or inline JSON); adds a typed `parsed` column.")
    regex: str | None = option(None, "Regular expression the whole completion must match.")
    choices: list[str] | None = option(None, "a,b,c: the completion is exactly one of these.", cli="comma")
    grammar: str | None = option(None, "Lark grammar file the completion must match (llguidance's dialect).")
    logprobs: int | None = option(
        None, "Add `logprobs`: each generated token's log-probability and its K likeliest alternatives (0-20).",
        min=0, max=20)

    def reserved_tokens(self) -> int:
        return self.max_new_tokens

    def problems(self) -> list[str]:
        found = super().problems() + _template_problems(self.prompt_template)
        if self.top_p == 0:
            found.append("top_p: must be in (0, 1], got 0")
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            found.append(f"{given[1]}: give one constraint at most, got {', '.join(given)}")
        elif given:
            try:
                self.constraint().check()
            except (ValueError, OSError) as e:  # GrammarError is a ValueError
                found.append(f"{given[0]}: {one_line(e)}")
        return found

    def resolved(self) -> "GenerateOptions":
        """A copy holding the contents of --json-schema and --grammar files instead of their paths (what the
        actors, which may run elsewhere, and the job's fingerprint need); unreadable ones are left for
        problems() to report."""
        values = {}
        for name in ("json_schema", "grammar"):
            value = getattr(self, name)
            if value is not None and not _inline(name, value):
                try:
                    values[name] = read_text_file(value)
                except (OSError, ValueError):
                    pass
        return dataclasses.replace(self, **values) if values else self

    def constraint(self):
        """The persimmon.grammar.Grammar these options ask for, or None."""
        from persimmon.grammar import Grammar

        if self.json_schema is not None:
            text = self.json_schema if _inline("json_schema", self.json_schema) else read_text_file(self.json_schema)
            return Grammar.json_schema(text)
        if self.regex is not None:
            return Grammar.regex(self.regex)
        if self.choices is not None:
            return Grammar.choices(self.choices)
        if self.grammar is not None:
            return Grammar.lark(self.grammar if _inline("grammar", self.grammar) else read_text_file(self.grammar))
        return None

    @property
    def sampling(self):
        from persimmon import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=self.max_new_tokens, stop=tuple(self.stop), logprobs=self.logprobs,
                              grammar=self.constraint())


CONSTRAINTS = ("json_schema", "regex", "choices", "grammar")


def did_you_mean(key: str, known) -> str:
    """` (did you mean 'max_length'?)` for a key close to a known one, else nothing."""
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _inline(name: str, value: str) -> bool:
    """A JSON schema given inline starts with `{`; a Lark grammar inline holds a rule (`:`) over lines."""
    if name == "json_schema":
        return value.lstrip().startswith("{")
    return "\n" in value or ("start" in value and ":" in value and not Path(os.path.expanduser(value)).is_file())


def read_text_file(path: str) -> str:
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise ValueError(f"no such file: {path}")
    if file.stat().st_size > 1 << 20:
        raise ValueError(f"{path} is over 1 MiB: not a schema or grammar")
    return file.read_text(encoding="utf-8")


@dataclass
class EmbedOptions(ModelOptions):
    truncation_side: str = option("right", "Which end of a too-long text to drop.", choices=SIDES)
    pooling: str = option("last", "last = the final hidden state at the last real token (what a classifier "
                                  "head sees); mean = the average over the real tokens.", choices=tuple(Pooling))
    normalize: bool = option(False, "Scale each embedding to unit length (for cosine similarity).")


@dataclass
class ScoreOptions(ModelOptions):
    truncation_side: str = option("right", "Which end of a too-long text to drop.", choices=SIDES)
    prompt_template: str | None = option(
        None, "Score the text inside this prompt ({text} is replaced): only the text's own tokens are scored.",
        escapes=True)

    def problems(self) -> list[str]:
        return super().problems() + _template_problems(self.prompt_template)


@dataclass
class BatchAPIOptions(EngineOptions):
    """openai-batch: what holds for every line (each line brings its own sampling parameters)."""

    max_new_tokens: int = option(256, "Tokens a chat or completion line may generate when it gives no max_tokens "
                                      "(and the room left in the model's window allows).", min=1)
    pooling: str = option("last", "Embeddings: the last real token's final hidden state, or the mean.",
                          choices=tuple(Pooling))
    normalize: bool = option(True, "Embeddings: unit length, as OpenAI's are.")
