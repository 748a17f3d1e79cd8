"""persimmon: Adept's Persimmon language model in PyTorch (model, checkpoints, tokenizer, generation)."""

from .cache import KVCache
from .checkpoint import CheckpointError
from .config import PersimmonConfig
from .generate import GenerationOutput, SamplingParams
from .model import (
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonModel,
    PersimmonOutput,
    PersimmonPreTrainedModel,
)
from .tokenizer import PersimmonTokenizer

__version__ = "0.3.0"

__all__ = [
    "CheckpointError",
    "GenerationOutput",
    "KVCache",
    "PersimmonConfig",
    "PersimmonForCausalLM",
    "PersimmonForSequenceClassification",
    "PersimmonModel",
    "PersimmonOutput",
    "PersimmonPreTrainedModel",
    "PersimmonTokenizer",
    "SamplingParams",
]
