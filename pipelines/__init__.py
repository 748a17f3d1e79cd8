"""pipelines: Persimmon classification, embedding and generation over Arrow record batches (no Ray in here).

The pipeline classes are imported on first use: `pipelines.options` and `pipelines.schema` stay free of torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClassificationPipeline": ".classify",
    "EmbeddingPipeline": ".embed",
    "GenerationPipeline": ".generate",
    "PaddingStats": ".batching",
    "PipelineStats": ".batching",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
