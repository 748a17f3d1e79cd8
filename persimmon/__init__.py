"""persimmon: Adept's Persimmon language model in PyTorch (model, checkpoints, tokenizer, generation).

The names below are imported on first use, so that reading a config or a checkpoint's file list (the job
driver, the CLI) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_EXPORTS = {
    "CheckpointError": ".files",
    "GenerationOutput": ".generate",
    "KVCache": ".cache",
    "PersimmonConfig": ".config",
    "PersimmonForCausalLM": ".model",
    "PersimmonForSequenceClassification": ".model",
    "PersimmonModel": ".model",
    "PersimmonOutput": ".model",
    "PersimmonPreTrainedModel": ".model",
    "PersimmonTokenizer": ".tokenizer",
    "SamplingParams": ".generate",
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
