"""persimmon: Adept's Persimmon language model in PyTorch (model, checkpoints, tokenizer, generation).

The names below are imported on first use, so that reading a config or a checkpoint's file list (the job
driver, the CLI) does not load torch.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.11.1"

_EXPORTS = {
    "CheckpointError": ".files",
    "FinishReason": ".sampling",
    "GenerationEngine": ".engine",
    "Grammar": ".grammar",
    "GenerationOutput": ".generate",
    "KVCache": ".cache",
    "PersimmonConfig": ".config",
    "PersimmonForCausalLM": ".model",
    "PersimmonForSequenceClassification": ".model",
    "PersimmonModel": ".model",
    "PersimmonOutput": ".model",
    "PersimmonPreTrainedModel": ".model",
    "PersimmonTokenizer": ".tokenizer",
    "SamplingParams": ".sampling",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
