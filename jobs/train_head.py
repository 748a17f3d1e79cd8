"""train-head: from a base checkpoint and labeled rows to a PersimmonForSequenceClassification checkpoint.

1. The label column is read and checked first (types, nulls, rare labels): cheap, and before any GPU time.
2. The rows' `last` features come from an ordinary embed job (the runner: on the cluster, exactly once,
   resumable; a second train-head over the same rows and model finds them done and reuses them).
3. The head is fitted on the driver (pipelines/head.py), evaluated on a stratified held-out part against
   the majority-class baseline, and written with the base's weights linked, not copied
   (persimmon.checkpoint.save_with_head), with metrics.json and a model card.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from persimmon.config import ProblemType
from persimmon.files import TOKENIZER_FILES
from pipelines.options import EmbedOptions, ModelOptions, Pooling
from pipelines.schema import added_columns, clashing_columns, embedding_schema, is_text_type, missing_text_column

from .errors import BatchError, UsageError
from .inputs.discovery import discover
from .output.paths import absolute, join, resolve
from .output.lease import LEASE_DIR
from .output.ownership import check_train_head_folder
from .spec import JobSpec, RunnerSettings

METRICS = "metrics.json"
FEATURES_JOB = "train-head features"  # the embed job's name: a features folder train-head may replace
WRITTEN_BY = "persimmon-batch train-head"  # metrics.json's mark: a directory train-head may replace


class TrainHeadError(UsageError):
    """The labeled input or the arguments cannot give a head; the message says why (one line)."""


class FeatureJobUnfinished(BatchError):
    """The embed job behind train-head did not finish; `code` is its exit status (1, 75, 130, 143)."""

    def __init__(self, code: int) -> None:
        self.code = self.exit_code = code
        super().__init__(f"the feature job did not finish (exit {code}); rerun the same command to resume it")


@dataclass
class TrainHeadSpec:
    base: str
    input: str
    label_column: str
    output: str
    text_column: str = "text"
    holdout: float = 0.1
    multi_label: bool = False
    seed: int = 0
    features: str | None = None  # where the embed job writes (default: under the cache, for a local run)
    penalty: float | None = None  # L2 strength (default: chosen on a validation part)
    options: ModelOptions = field(default_factory=ModelOptions)
    runner: RunnerSettings = field(default_factory=RunnerSettings)

    def features_dir(self) -> str:
        if self.features:
            return self.features
        if self.runner.address is not None:
            raise TrainHeadError("on a cluster, give --features DIR: a folder every node can write "
                                 "(shared storage or an object store URI) for the rows' features")
        from .output.paths import cache_dir

        key = json.dumps([str(Path(self.base).resolve()), absolute(self.input), self.text_column])
        return str(cache_dir() / "features" / hashlib.sha256(key.encode()).hexdigest()[:16])

    def check_features(self) -> None:
        """The features folder is replaced when the base or the rows change: only one that holds train-head
        features (or nothing) may be used, never another job's output or the user's files."""
        from .output.manifest import Manifest

        fs, base = resolve(self.features_dir())
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.File:
            raise TrainHeadError(f"--features {self.features_dir()} is a file; give a folder")
        manifest = Manifest.load(fs, base)
        if manifest is not None:
            if manifest.data.get("spec", {}).get("name") != FEATURES_JOB:
                raise TrainHeadError(f"--features {self.features_dir()} holds the output of another job "
                                     f"({manifest.data.get('spec', {}).get('task')} job "
                                     f"{manifest.data.get('spec', {}).get('name')!r}); give a folder of its own")
        elif fs.get_file_info(pafs.FileSelector(base)):
            raise TrainHeadError(f"--features {self.features_dir()} is not empty and holds no train-head features; "
                                 "give a new folder")

    def embed_spec(self) -> JobSpec:
        options = EmbedOptions(dtype=self.options.dtype, max_length=self.options.max_length,
                               batch_tokens=self.options.batch_tokens, pooling=Pooling.LAST, normalize=False)
        # overwrite: the features follow the base model; an earlier model's features are replaced
        # only_where: unlabeled rows keep their place but never reach the model (they are not trained on)
        return JobSpec("embed", self.base, self.input, self.features_dir(), self.text_column, options, self.runner,
                       name=FEATURES_JOB, overwrite=True, only_where=self.label_column)


# -- labels ---------------------------------------------------------------------------------------------------

def _scalar_kind(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_boolean(kind))


def check_label_type(name: str, kind: pa.DataType, multi_label: bool) -> None:
    if multi_label:
        if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _scalar_kind(kind.value_type):
            return
        raise TrainHeadError(f"label column {name!r} holds {kind}; --multi-label needs lists of strings, "
                             "integers or booleans (one list of labels per row)")
    if _scalar_kind(kind):
        return
    hint = "; for a list of labels per row use --multi-label" if pa.types.is_list(kind) else ""
    raise TrainHeadError(f"label column {name!r} holds {kind}; expected strings, integers or booleans{hint}")


def _name(value: Any) -> str | None:
    """A label value's name; None for a missing one (null, empty or blank string)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    return text or None


def row_labels(values: list, multi_label: bool) -> list[list[str] | None]:
    """Per row: its label names (one for single-label), or None when it has none (skipped)."""
    out = []
    for value in values:
        if multi_label:
            names = sorted({n for n in (_name(v) for v in (value or [])) if n is not None})
            out.append(names or None)
        else:
            name = _name(value)
            out.append(None if name is None else [name])
    return out


def _label_order(names) -> list[str]:
    """Integers in numeric order, then the rest alphabetically."""
    def key(name: str):
        try:
            return (0, int(name), "")
        except ValueError:
            return (1, 0, name)
    return sorted(names, key=key)


def _short(label: str, width: int = 40) -> str:
    return repr(label if len(label) <= width else label[:width] + "...")


def describe_counts(counts: collections.Counter, shown: int = 20) -> str:
    names = _label_order(counts)
    text = ", ".join(f"{_short(n)[1:-1]} {counts[n]}" for n in names[:shown])
    return text + (f" and {len(names) - shown} more labels" if len(names) > shown else "")


@dataclass
class LabelCheck:
    counts: collections.Counter
    rows: int
    unlabeled: int


def check_labels(labels: list[list[str] | None], column: str) -> LabelCheck:
    counts = collections.Counter(n for row in labels if row for n in row)
    unlabeled = sum(1 for row in labels if row is None)
    if not counts:
        raise TrainHeadError(f"label column {column!r} has no labels: every one of its {len(labels)} rows is "
                             "null or empty")
    if len(counts) < 2:
        only = next(iter(counts))
        raise TrainHeadError(f"label column {column!r} has one label only ({_short(only)} on {counts[only]} rows); "
                             "a classifier needs at least two")
    rare = sorted(name for name, n in counts.items() if n < 2)
    if rare:
        shown = ", ".join(_short(n) for n in rare[:10]) + (f" and {len(rare) - 10} more" if len(rare) > 10 else "")
        raise TrainHeadError(f"label(s) {shown} of column {column!r} have fewer than 2 rows; give each label at "
                             "least 2 rows (better dozens) or drop those rows")
    return LabelCheck(counts, len(labels), unlabeled)


def read_input_labels(spec: TrainHeadSpec) -> LabelCheck:
    """Read and check the label column of every input shard (only that column is read)."""
    discovery = discover(spec.input)
    adds = added_columns(embedding_schema(1)).names  # what the features job adds (names only)
    labels: list[list[str] | None] = []
    for shard in discovery.shards:
        path = join(discovery.base, shard)
        try:
            with discovery.fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                if spec.label_column not in names:
                    raise TrainHeadError(f"input shard {shard} has no column {spec.label_column!r}; its columns "
                                         f"are {names}")
                problem = missing_text_column(spec.text_column, names, f"input shard {shard}") or \
                    clashing_columns(adds, names, "the features job adds")
                if problem:
                    raise TrainHeadError(problem)
                text_type = parquet.schema_arrow.field(spec.text_column).type
                if not is_text_type(text_type):
                    raise TrainHeadError(f"text column {spec.text_column!r} of {shard} holds {text_type}, not text")
                check_label_type(spec.label_column, parquet.schema_arrow.field(spec.label_column).type,
                                 spec.multi_label)
                values = parquet.read(columns=[spec.label_column]).column(0).to_pylist()
        except pa.ArrowInvalid as exc:
            raise TrainHeadError(f"input shard {shard} is not a Parquet file ({exc})") from None
        labels += row_labels(values, spec.multi_label)
    return check_labels(labels, spec.label_column)


# -- features -------------------------------------------------------------------------------------------------

@dataclass
class Rows:
    features: Any  # torch.Tensor (N, hidden)
    labels: list[list[str]]
    unlabeled: int
    unusable: collections.Counter  # error message -> rows whose text gave no features


def read_features(spec: TrainHeadSpec) -> Rows:
    """The embed job's output, in input order: one feature vector per labeled row with a usable text."""
    import numpy as np
    import torch

    discovery = discover(spec.input)
    fs, base = resolve(spec.features_dir())
    chunks, labels, unlabeled, unusable = [], [], 0, collections.Counter()
    for shard in discovery.shards:
        with fs.open_input_file(join(base, discovery.output(shard))) as f:
            table = pq.read_table(f, columns=[spec.label_column, "embedding", "error"])
        row_names = row_labels(table.column(0).to_pylist(), spec.multi_label)
        errors = table.column("error").to_pylist()
        embedding = table.column("embedding").combine_chunks()
        keep = []
        for i, (names, error) in enumerate(zip(row_names, errors)):
            if names is None:
                unlabeled += 1
            elif error is not None:
                unusable[error] += 1
            else:
                keep.append(i)
                labels.append(names)
        if keep:
            width = embedding.type.list_size
            flat = embedding.take(pa.array(keep)).flatten().to_numpy(zero_copy_only=False)
            chunks.append(torch.from_numpy(np.array(flat, dtype=np.float32).reshape(len(keep), width)))  # a copy
    features = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return Rows(features, labels, unlabeled, unusable)


# -- the whole command ----------------------------------------------------------------------------------------

def _foreign_files(out: Path) -> list[str] | None:
    """For a directory train-head wrote (its metrics.json says so): the entries in it that train-head did
    not write (empty: safe to replace); None when it is not a train-head output at all."""
    try:
        metrics = json.loads((out / METRICS).read_text())
        index = json.loads((out / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or metrics.get("written_by") != WRITTEN_BY:
        return None
    ours = {METRICS, "README.md", "config.json", "model.safetensors.index.json", LEASE_DIR, *TOKENIZER_FILES,
            *index.get("weight_map", {}).values()}
    return sorted(entry.name for entry in out.iterdir() if entry.name not in ours)


def check_output(spec: TrainHeadSpec) -> Path:
    out, base = Path(spec.output).resolve(), Path(spec.base).resolve()
    if "://" in spec.output:
        raise TrainHeadError(f"--output must be a local directory (the new checkpoint links the base's weight "
                             f"files), got {spec.output}")
    if out == base or base in out.parents or out in base.parents:
        raise TrainHeadError(f"--output {spec.output} must be outside the base model {spec.base} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise TrainHeadError(f"--output {spec.output} is a file; choose a new directory")
    check_train_head_folder(out)
    if out.exists() and any(e.name != LEASE_DIR for e in out.iterdir()):
        foreign = _foreign_files(out)
        if foreign is None:
            raise TrainHeadError(f"--output {spec.output} exists and is not a train-head output; choose a new directory")
        if foreign:
            raise TrainHeadError(f"--output {spec.output} is a train-head output that now also holds "
                                 f"{', '.join(foreign[:5])}: retraining would replace them; move them or choose "
                                 "another directory")
    features = spec.features_dir()
    if "://" not in features:
        where = Path(features).resolve()
        if where == out or out in where.parents or where in out.parents:
            raise TrainHeadError(f"--features {features} must be outside --output {spec.output} (the model "
                                 "directory is replaced as a whole)")
        if where == base or base in where.parents:
            raise TrainHeadError(f"--features {features} must be outside the base model {spec.base}")
    if not 0 <= spec.holdout < 1:
        raise TrainHeadError(f"--holdout must be in [0, 1), got {spec.holdout}")
    return out


def train_head(spec: TrainHeadSpec, run_embed: Callable[[JobSpec], int], echo: Callable[[str], None] = print) -> dict:
    """The whole train-head; run_embed runs the feature job and returns its exit status. Returns the metrics
    written to metrics.json. Raises TrainHeadError with a one-line message for bad input."""
    out = Path(spec.output).resolve()
    if (out / LEASE_DIR).is_dir():  # a folder some run of ours holds or held: who holds it says more
        _lock(out, spec).release()
    out = check_output(spec)
    checked = read_input_labels(spec)
    echo(f"labels in {spec.label_column!r}: {describe_counts(checked.counts)}"
         + (f"; {checked.unlabeled} rows without a label are skipped" if checked.unlabeled else ""))
    spec.check_features()
    lease = _lock(out, spec)
    written = False
    try:
        check_output(spec)  # again, now that no other command can write there
        metrics = _train(spec, out, checked, run_embed, echo)
        written = True
        return metrics
    finally:
        lease.release(discard=not written)


def _lock(out: Path, spec: TrainHeadSpec):
    """One owner of the output folder, whatever the command: the same lease as a classify job's, in the same
    place (`OUT/_lease/`), held for the whole command, the features job included."""
    from .output.lease import OutputLease

    fs, base = resolve(str(out))
    lease = OutputLease(fs, base, str(out), ttl=spec.runner.lease_ttl, command="train-head")
    lease.acquire()  # OutputBusy names the run holding it
    lease.start_heartbeat()
    return lease


def _train(spec: TrainHeadSpec, out: Path, checked: LabelCheck, run_embed, echo) -> dict:
    import torch

    from persimmon import __version__
    from persimmon.checkpoint import checkpoint_heads, save_with_head
    from persimmon.config import PersimmonConfig
    from pipelines import head

    base_config = PersimmonConfig.from_pretrained(spec.base)
    notes = []
    if "score" in checkpoint_heads(Path(spec.base)):
        notes.append(f"the base {spec.base} is already a classifier (labels "
                     f"{list(base_config.id2label.values())}): its head is replaced by the one trained here")
        echo("note: " + notes[-1])
    embed = spec.embed_spec()
    echo(f"features (last-token hidden states) -> {embed.output}")
    code = run_embed(embed)
    if code != 0:
        raise FeatureJobUnfinished(code)

    rows = read_features(spec)
    if rows.unusable:
        echo(f"skipped {sum(rows.unusable.values())} labeled rows whose text gave no features: "
             + "; ".join(f"{message} ({n})" for message, n in rows.unusable.most_common()))
    wanted = set(checked.counts)
    checked = check_labels(rows.labels, spec.label_column)  # the rows that are left must still make a task
    lost = sorted(wanted - set(checked.counts))
    if lost:
        raise TrainHeadError(f"label(s) {', '.join(_short(n) for n in lost[:10])} have no rows left once rows whose "
                             "text gave no features are skipped; fix those texts or drop the label")
    names = _label_order(checked.counts)
    ids = {n: i for i, n in enumerate(names)}
    K = len(names)
    if spec.multi_label:
        targets = torch.zeros(len(rows.labels), K, dtype=torch.long)
        for r, row in enumerate(rows.labels):
            targets[r, [ids[n] for n in row]] = 1
        groups = [0] * len(rows.labels)
    else:
        targets = torch.tensor([ids[row[0]] for row in rows.labels])
        groups = targets.tolist()
    kept, held = head.split(groups, spec.holdout, spec.seed)
    fitted = head.fit_head(rows.features[kept], targets[kept], K, spec.multi_label, spec.penalty, spec.seed)
    baseline_prediction = head.majority(targets[kept], spec.multi_label, K)

    def evaluate(part):
        truth = targets[part]
        got = head.metrics(head.predict(fitted.weight, rows.features[part], spec.multi_label), truth,
                           spec.multi_label, K)
        guess = baseline_prediction.expand_as(truth) if spec.multi_label else baseline_prediction.repeat(len(part))
        return got, head.metrics(guess, truth, spec.multi_label, K)

    train_metrics, _ = evaluate(kept)
    held_metrics, baseline = evaluate(held) if held else (None, None)
    problem = ProblemType.MULTI_LABEL if spec.multi_label else ProblemType.SINGLE_LABEL

    part_counts = {n: {"train": 0, "holdout": 0} for n in names}
    for part, key in ((kept, "train"), (held, "holdout")):
        for r in part:
            for n in rows.labels[r]:
                part_counts[n][key] += 1
    metrics = {
        "base_model": str(Path(spec.base).resolve()), "input": absolute(spec.input),
        "label_column": spec.label_column, "text_column": spec.text_column, "problem_type": problem,
        "labels": names, "label_counts": part_counts, "rows": {"train": len(kept), "holdout": len(held),
        "skipped_without_label": rows.unlabeled, "skipped_unusable_text": sum(rows.unusable.values())},
        "holdout_fraction": spec.holdout, "seed": spec.seed, "l2_penalty": fitted.penalty,
        "features": "last-token final hidden state (after the final LayerNorm)", "feature_dir": embed.output,
        "train": train_metrics, "holdout": held_metrics, "majority_baseline": baseline,
        "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "package_version": __version__, "notes": notes, "written_by": WRITTEN_BY,
    }

    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        notes += save_with_head(spec.base, staging, fitted.weight, dict(enumerate(names)), problem)
        linked = sorted({str(p.resolve().parent) for p in staging.iterdir() if p.is_symlink()})
        metrics["weights_linked_from"] = linked
        (staging / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(metrics))
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    echo(f"trained on {len(kept)} rows, held out {len(held)} (L2 penalty {fitted.penalty:g}); "
         f"training accuracy {train_metrics['accuracy']:.3f}")
    if held_metrics is not None:
        kind = "exact-match accuracy" if spec.multi_label else "accuracy"
        echo(f"held-out {kind} {held_metrics['accuracy']:.3f}, macro-F1 {held_metrics['macro_f1']:.3f}; "
             f"majority-class baseline {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}")
    elif spec.holdout == 0:
        echo("no rows held out (--holdout 0): no held-out figures")
    else:
        echo(f"no rows held out: every label has too few rows for --holdout {spec.holdout:g} (each label keeps "
             "round(holdout x its rows) rows aside); no held-out figures")
    echo(f"wrote {spec.output}: PersimmonForSequenceClassification, {K} labels, {problem}; the base's weights "
         f"are linked from {', '.join(metrics['weights_linked_from']) or '(nothing: all copied)'} (keep them in place)")
    return metrics


def _install(staging: Path, out: Path) -> None:
    """Move the new checkpoint's files into the output folder, which stays in place (its lease lives in it):
    each file replaces its old version atomically, weights first and config.json last, then files of the old
    checkpoint that the new one does not have are removed."""
    new = sorted(staging.iterdir(), key=lambda p: (p.name in (METRICS, "config.json"), p.name))
    out.mkdir(parents=True, exist_ok=True)
    old = {p.name for p in out.iterdir() if p.name != LEASE_DIR}
    for path in new:
        os.replace(path, out / path.name)
    for name in sorted(old - {p.name for p in new}):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def model_card(m: dict) -> str:
    lines = [
        f"# Persimmon classifier: {m['label_column']}", "",
        f"A linear head (`score.weight`, no bias, L2 {m['l2_penalty']:g}) trained by `persimmon-batch train-head` "
        f"on the frozen last-token features of `{m['base_model']}`. Its weight files are symbolic links to "
        f"{', '.join(f'`{d}`' for d in m.get('weights_linked_from', [])) or 'nothing (copies)'}: keep those in place.", "",
        f"- task: {m['problem_type']}; labels: {', '.join(m['labels'])}",
        f"- data: `{m['input']}`, text column `{m['text_column']}`, label column `{m['label_column']}`",
        f"- rows: {m['rows']['train']} trained on, {m['rows']['holdout']} held out (seed {m['seed']}); skipped: "
        f"{m['rows']['skipped_without_label']} without a label, {m['rows']['skipped_unusable_text']} unusable texts",
        "", "| label | train | held out |", "|---|---|---|",
        *[f"| {n} | {c['train']} | {c['holdout']} |" for n, c in m["label_counts"].items()], "",
    ]
    if m["holdout"] is not None:
        lines += ["| held out | accuracy | macro-F1 |", "|---|---|---|",
                  f"| this head | {m['holdout']['accuracy']:.3f} | {m['holdout']['macro_f1']:.3f} |",
                  f"| majority class | {m['majority_baseline']['accuracy']:.3f} | "
                  f"{m['majority_baseline']['macro_f1']:.3f} |", ""]
    lines += [f"Created {m['created_at']} with persimmon-batch {m['package_version']}.", ""]
    for note in m["notes"]:
        lines.insert(-1, f"Note: {note}.")
    return "\n".join(lines)
