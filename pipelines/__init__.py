"""pipelines: Persimmon classification and generation over Arrow record batches (no Ray in here)."""

from .batching import PaddingStats, PipelineStats
from .classify import ClassificationPipeline
from .generate import GenerationPipeline

__all__ = ["ClassificationPipeline", "GenerationPipeline", "PaddingStats", "PipelineStats"]
