"""pipelines: Persimmon classification, embedding and generation over Arrow record batches (no Ray in here)."""

from .batching import PaddingStats, PipelineStats
from .classify import ClassificationPipeline
from .embed import EmbeddingPipeline
from .generate import GenerationPipeline

__all__ = ["ClassificationPipeline", "EmbeddingPipeline", "GenerationPipeline", "PaddingStats", "PipelineStats"]
