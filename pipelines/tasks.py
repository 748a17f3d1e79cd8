"""The task registry: one entry declares a task -- its options, its pipeline, the columns it adds, whether
it runs a causal LM, and its CLI command's help. The CLI, job files, the runner and the actors read it.

Adding a task: its module in pipelines/ (a pipeline class taking (model_dir, options, device=,
text_column=), with __call__ and stream over record batches) and one entry here. This module stays free of
torch: the pipeline is imported only where it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from .options import BatchAPIOptions, ClassifyOptions, EmbedOptions, GenerateOptions, ModelOptions, ScoreOptions
from .schema import SCORE, embedding_schema, generation_schema, parsed_type, classification_schema


@dataclass(frozen=True)
class Task:
    name: str
    options: type[ModelOptions]
    pipeline: str  # "module:Class" inside pipelines/
    summary: str  # the CLI command's help
    columns: Callable[[Any, Any], pa.Schema]  # (model config, options) -> the columns added (before `error`)
    needs_lm: Callable[[Any], bool] = lambda options: True  # (options) -> runs a causal LM
    requests: bool = False  # reads OpenAI batch request lines (no text column), writes JSON Lines

    def pipeline_class(self) -> type:
        module, name = self.pipeline.split(":")
        return getattr(importlib.import_module(f"pipelines.{module}"), name)


def _generate_columns(config, options: GenerateOptions) -> pa.Schema:
    grammar = options.constraint()
    return generation_schema(parsed_type(grammar.schema) if grammar is not None else None,
                             options.logprobs is not None)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("classify", ClassifyOptions, "classify:ClassificationPipeline",
         "Classify every row: label, score and probs (or labels / score for multi-label and regression models).",
         lambda config, o: classification_schema(config, o.zero_shot), lambda o: o.zero_shot),
    Task("generate", GenerateOptions, "generate:GenerationPipeline",
         "Generate a completion for every row: completion, finish_reason, prompt_tokens, completion_tokens "
         "(and `parsed` under --json-schema, `logprobs` with --logprobs).",
         _generate_columns),
    Task("embed", EmbedOptions, "embed:EmbeddingPipeline",
         "Embed every row: `embedding`, the final hidden state pooled at the last real token (or the mean).",
         lambda config, o: embedding_schema(config.hidden_size), lambda o: False),
    Task("score", ScoreOptions, "score:ScorePipeline",
         "Score every row by a causal LM's likelihood: logprob (summed over its tokens after BOS), tokens, "
         "perplexity.",
         lambda config, o: SCORE),
    Task("openai-batch", BatchAPIOptions, "batch_api:OpenAIBatchPipeline",
         "Serve OpenAI batch files (.jsonl of /v1/chat/completions, /v1/completions and /v1/embeddings requests): "
         "OUT/<name>.jsonl holds the responses, OUT/<name>.errors.jsonl the failed lines.",
         lambda config, o: pa.schema([("record", pa.string())]), requests=True),
)}
TASK_OPTIONS: dict[str, type[ModelOptions]] = {name: t.options for name, t in TASKS.items()}
