"""The columns each task adds to its output, and how they are appended to the input."""

from __future__ import annotations

import pyarrow as pa

PROBS = pa.list_(pa.float32())

SINGLE_LABEL = pa.schema([("label", pa.string()), ("score", pa.float32()), ("probs", PROBS)])
MULTI_LABEL = pa.schema([("labels", pa.list_(pa.string())), ("probs", PROBS)])
REGRESSION = pa.schema([("score", pa.float32())])
ZERO_SHOT = SINGLE_LABEL
GENERATION = pa.schema([
    ("completion", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
])
ERROR = pa.field("error", pa.string())


def is_text_type(kind: pa.DataType) -> bool:
    """Whether a column of this type holds text a pipeline can read (strings, UTF-8 bytes, dictionary strings)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        return pa.types.is_string(kind)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def embedding_schema(hidden_size: int) -> pa.Schema:
    """One fixed-size float32 vector per row, the model's hidden size."""
    return pa.schema([("embedding", pa.list_(pa.float32(), hidden_size))])


def classification_kind(config) -> str:
    """"regression", "single_label_classification" or "multi_label_classification", from a classifier's config."""
    return config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")


def task_schema(task: str, config, zero_shot: bool = False) -> pa.Schema:
    """The columns a task adds (before `error`), for a model with this config."""
    if task == "generate":
        return GENERATION
    if task == "embed":
        return embedding_schema(config.hidden_size)
    if zero_shot:
        return ZERO_SHOT
    return {"regression": REGRESSION, "single_label_classification": SINGLE_LABEL,
            "multi_label_classification": MULTI_LABEL}[classification_kind(config)]


def added_columns(task_schema: pa.Schema) -> pa.Schema:
    """The task's columns plus `error`, in output order."""
    return pa.schema([*task_schema, ERROR])


def append_columns(batch: pa.RecordBatch | pa.Table, task_schema: pa.Schema, columns: dict[str, list],
                   errors: list[str | None]) -> pa.Table:
    """The input with the task's columns and `error` appended; input columns of the same names are refused,
    since overwriting a user's column silently would lose data."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    schema = added_columns(task_schema)
    clash = [name for name in schema.names if name in table.schema.names]
    if clash:
        raise ValueError(f"the input already has column(s) {clash} that the output adds; rename them first")
    for field in task_schema:
        values = columns[field.name]
        table = table.append_column(field, values if isinstance(values, pa.Array) else pa.array(values, type=field.type))
    return table.append_column(ERROR, pa.array(errors, type=pa.string()))
