"""The columns each task adds to its output, and how they are appended to the input."""

from __future__ import annotations

import pyarrow as pa

from persimmon.config import ProblemType


def list_of(kind: pa.DataType, size: int = -1) -> pa.DataType:
    """A list type whose item is named "element", as Parquet names it: a table a pipeline returns then has the
    schema its file has when read back (pyarrow's own default name, "item", is renamed in the file)."""
    return pa.list_(pa.field("element", kind), size)


PROBS = list_of(pa.float32())

SINGLE_LABEL = pa.schema([("label", pa.string()), ("score", pa.float32()), ("probs", PROBS)])
MULTI_LABEL = pa.schema([("labels", list_of(pa.string())), ("probs", PROBS)])
REGRESSION = pa.schema([("score", pa.float32())])
ZERO_SHOT = SINGLE_LABEL
GENERATION = pa.schema([
    ("completion", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
])
ERROR = pa.field("error", pa.string())
# a reader's per-row problem (a CSV / JSON Lines row it could not read as it is): the pipelines take it as the
# row's error, and the job drops the column from what it writes
INPUT_ERROR = "_input_error"
# A piece of the sentencepiece vocabulary is at most this many characters (its max_piece_length default),
# so max_length tokens never need more than this many characters per token of text.
MAX_CHARS_PER_TOKEN = 16
MAX_LINE_BYTES = 8 << 20  # an OpenAI batch request line longer than this is that line's error, before it is parsed
SCORE = pa.schema([("logprob", pa.float64()), ("tokens", pa.int32()), ("perplexity", pa.float64())])
_ALTERNATIVE = pa.struct([("token", pa.string()), ("id", pa.int32()), ("logprob", pa.float32())])
LOGPROBS = pa.field("logprobs", list_of(pa.struct([
    ("token", pa.string()), ("id", pa.int32()), ("logprob", pa.float32()),
    ("top_logprobs", list_of(_ALTERNATIVE))])))
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class UnmappedSchema(ValueError):
    """A JSON schema with no Arrow type (the output then has no `parsed` column)."""


def arrow_type(schema: dict, where: str = "the schema") -> pa.DataType:
    """The Arrow type of values matching a JSON schema: object -> struct (its declared properties, in order; a
    property not required is nullable), string / enum of strings -> string, integer -> int64, number ->
    float64, boolean -> bool, array -> list. Raises UnmappedSchema naming the part that does not map."""
    if not isinstance(schema, dict):
        raise UnmappedSchema(f"{where} is not a schema object")
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: nullable, which every Arrow value is
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise UnmappedSchema(f"{where} allows several types {kind}")
        kind = kinds[0]
    if kind is None and "enum" in schema:
        if all(isinstance(v, str) for v in schema["enum"]):
            return pa.string()
        raise UnmappedSchema(f"{where} is an enum of values that are not all strings")
    if kind is None and isinstance(schema.get("const"), str):
        return pa.string()
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        if not isinstance(schema.get("items"), dict):
            raise UnmappedSchema(f"{where} is an array without one `items` schema")
        return list_of(arrow_type(schema["items"], f"{where}.items"))
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise UnmappedSchema(f"{where} is an object without declared properties")
        if schema.get("additionalProperties") not in (None, False):
            raise UnmappedSchema(f"{where} allows properties it does not declare (additionalProperties)")
        required = set(schema.get("required", ()))
        return pa.struct([pa.field(name, arrow_type(sub, f"{where}.{name}"), nullable=name not in required)
                          for name, sub in properties.items()])
    raise UnmappedSchema(f"{where} has no type this maps ({', '.join(k for k in ('anyOf', 'oneOf', 'allOf', '$ref') if k in schema) or kind!r})")


def parsed_type(schema: dict | None) -> pa.DataType | None:
    """The `parsed` column's type for a --json-schema, or None when the schema does not map."""
    if schema is None:
        return None
    try:
        return arrow_type(schema)
    except UnmappedSchema:
        return None


def generation_schema(parsed: pa.DataType | None = None, logprobs: bool = False) -> pa.Schema:
    """generate's columns: the fixed four, then `parsed` (with a mappable --json-schema), then `logprobs`."""
    fields = list(GENERATION)
    if parsed is not None:
        fields.append(pa.field("parsed", parsed))
    if logprobs:
        fields.append(LOGPROBS)
    return pa.schema(fields)


def is_text_type(kind: pa.DataType) -> bool:
    """Whether a column of this type holds text a pipeline can read (strings, UTF-8 bytes, dictionary strings)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        return pa.types.is_string(kind)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def embedding_schema(hidden_size: int) -> pa.Schema:
    """One fixed-size float32 vector per row, the model's hidden size."""
    return pa.schema([("embedding", list_of(pa.float32(), hidden_size))])


def classification_kind(config) -> ProblemType:
    """A classifier's problem type, from its config (where it says none: one label is regression)."""
    if config.problem_type:
        return ProblemType(config.problem_type)
    return ProblemType.REGRESSION if config.num_labels == 1 else ProblemType.SINGLE_LABEL


def classification_schema(config, zero_shot: bool = False) -> pa.Schema:
    """The columns classify adds (before `error`) for a model with this config, or for zero-shot."""
    if zero_shot:
        return ZERO_SHOT
    return {ProblemType.REGRESSION: REGRESSION, ProblemType.SINGLE_LABEL: SINGLE_LABEL,
            ProblemType.MULTI_LABEL: MULTI_LABEL}[classification_kind(config)]


def missing_text_column(name: str, columns, where: str = "the input") -> str | None:
    """The one rule for the text column, wherever it is checked (a job's front, its plan, a worker's read, a
    pipeline's batch, train-head): it is one of the input's columns. The problem in words, or None."""
    if name in columns:
        return None
    return f"text column {name!r} not in {where}; its columns are {list(columns)}"


def clashing_columns(added, columns, adder: str = "the output adds") -> str | None:
    """The one rule for the columns a task adds: none may be one of the input's (overwriting a user's column
    silently would lose data). The problem in words, or None."""
    clash = [name for name in added if name in columns]
    if clash:
        return f"the input already has column(s) {clash} that {adder}; rename them first"
    return None


def added_columns(task_schema: pa.Schema) -> pa.Schema:
    """The task's columns plus `error`, in output order."""
    return pa.schema([*task_schema, ERROR])


def append_columns(batch: pa.RecordBatch | pa.Table, task_schema: pa.Schema, columns: dict[str, list],
                   errors: list[str | None]) -> pa.Table:
    """The input with the task's columns and `error` appended; input columns of the same names are refused,
    since overwriting a user's column silently would lose data."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    schema = added_columns(task_schema)
    problem = clashing_columns(schema.names, table.schema.names)
    if problem:
        raise ValueError(problem)
    for field in task_schema:
        values = columns[field.name]
        table = table.append_column(field, values if isinstance(values, pa.Array) else pa.array(values, type=field.type))
    return table.append_column(ERROR, pa.array(errors, type=pa.string()))
