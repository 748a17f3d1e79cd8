"""pipelines: Persimmon classification, embedding, generation, scoring and OpenAI batch requests over Arrow record
batches (no Ray in here).

The pipeline classes are imported on first use: `pipelines.options` and `pipelines.schema` stay free of torch.
"""

from __future__ import annotations

from persimmon.lazy import lazy_exports

_EXPORTS = {
    "ClassificationPipeline": ".classify",
    "EmbeddingPipeline": ".embed",
    "GenerationPipeline": ".generate",
    "OpenAIBatchPipeline": ".batch_api",
    "PaddingStats": ".batching",
    "PipelineStats": ".batching",
    "ScorePipeline": ".score",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
