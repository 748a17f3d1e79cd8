"""PersimmonConfig: the model's hyper-parameters, read from and written to `config.json`.

Reads both layouts found in the wild: the Hub / transformers 4.37 one (`rope_theta`, `rope_scaling`,
`partial_rotary_factor`, `torch_dtype`) and the transformers 5.x one (`rope_parameters`, `dtype`).
Writes the Hub layout, which both transformers generations read. Shape defaults are the real 8B
checkpoint's values (adept/persimmon-8b-base), but a config file is always read whole: nothing relies on a
default that a file could have overridden (5.x's own class, for one, defaults rope_theta to 10000).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .kinds import Kind

CONFIG_NAME = "config.json"

# dtype names -> their canonical names; torch itself is imported only where a torch.dtype is needed, so that
# reading a config (the job driver, the CLI) does not load torch
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


class ProblemType(Kind):
    """A sequence classifier's problem type (transformers' `problem_type`, its value in config.json)."""

    REGRESSION = "regression"
    SINGLE_LABEL = "single_label_classification"
    MULTI_LABEL = "multi_label_classification"


PROBLEM_TYPES = tuple(p.value for p in ProblemType)
ROPE_TYPES = ("linear", "dynamic")

# transformers bookkeeping keys that carry no model meaning; read, never written back
_IGNORED_KEYS = {
    "_name_or_path", "transformers_version", "architectures", "model_type", "auto_map", "_commit_hash",
    "_attn_implementation_autoset", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss", "cross_attention_hidden_size",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
}


# what each config.json value must be, checked field by field before anything is built from it
_INTEGERS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "num_labels")
_OPTIONAL_INTEGERS = ("pad_token_id", "bos_token_id", "eos_token_id")
_NUMBERS = ("initializer_range", "layer_norm_eps", "rope_theta", "hidden_dropout", "attention_dropout",
            "partial_rotary_factor")
_BOOLEANS = ("use_cache", "tie_word_embeddings", "qk_layernorm")
_OPTIONAL_STRINGS = ("hidden_act", "problem_type", "torch_dtype")
_OPTIONAL_OBJECTS = ("rope_scaling", "id2label", "label2id", "rope_parameters")


def _type_problem(name: str, value: Any) -> str | None:
    """Why a config.json value has the wrong JSON type for its field, or None."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name in _INTEGERS and not is_int:
        return f"config field {name}: expected an integer, got {value!r}"
    if name in _OPTIONAL_INTEGERS and value is not None and not is_int:
        return f"config field {name}: expected an integer or null, got {value!r}"
    if name in _NUMBERS and not (is_int or isinstance(value, float)):
        return f"config field {name}: expected a number, got {value!r}"
    if name in _BOOLEANS and not isinstance(value, bool):
        return f"config field {name}: expected true or false, got {value!r}"
    if name in _OPTIONAL_STRINGS and value is not None and not isinstance(value, str):
        return f"config field {name}: expected a string, got {value!r}"
    if name in _OPTIONAL_OBJECTS and value is not None and not isinstance(value, dict):
        return f"config field {name}: expected an object, got {value!r}"
    return None


def canonical_dtype(dtype) -> str | None:
    """A dtype name or torch.dtype -> its canonical name ("float32", "bfloat16", "float16"); None stays None.
    Unknown names raise with the choices."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))} or a torch.dtype")
    return _DTYPES[name]


def resolve_dtype(dtype):
    """A dtype name or torch.dtype -> torch.dtype; None stays None. Unknown names raise with the choices."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, canonical_dtype(dtype))


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class PersimmonConfig:
    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 25000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear" | "dynamic", "factor": float > 1}
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    partial_rotary_factor: float = 0.5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1  # the reference class's defaults; the real config.json says 71013
    eos_token_id: int | None = 2
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    torch_dtype: str | None = None
    # keys of config.json that this class does not model (a user's own annotations): kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._normalize_labels()
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            if "type" not in self.rope_scaling and "rope_type" in self.rope_scaling:
                self.rope_scaling["type"] = self.rope_scaling.pop("rope_type")
        if self.torch_dtype is not None:
            self.torch_dtype = canonical_dtype(self.torch_dtype)
        self.validate()

    # -- derived fields ---------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def _normalize_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
            # HF derives num_labels from id2label when both are given
            self.num_labels = len(self.id2label)
        elif self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
            self.id2label = {v: k for k, v in self.label2id.items()}
            self.num_labels = len(self.id2label)
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        """Raise ValueError naming the field and its value for any inconsistent setting."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"config field hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act != "relu2":
            raise ValueError(f"config field hidden_act must be 'relu2' (Persimmon's activation), got {self.hidden_act!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"config field partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"config field partial_rotary_factor ({self.partial_rotary_factor}) gives rotary dim {self.rotary_dim} "
                f"of head_dim {self.head_dim}; it must be even and at least 2"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"config field rope_theta must be positive, got {self.rope_theta!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"config field {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config field layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_TYPES:
                raise ValueError(f"config field rope_scaling.type must be one of {ROPE_TYPES}, got {kind!r}")
            factor = self.rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1.0:
                raise ValueError(f"config field rope_scaling.factor must be a number > 1, got {factor!r}")
            unknown = set(self.rope_scaling) - {"type", "factor"}
            if unknown:
                raise ValueError(f"config field rope_scaling has unknown keys {sorted(unknown)} for type {kind!r}")
        if self.problem_type is not None:
            if self.problem_type not in PROBLEM_TYPES:
                raise ValueError(f"config field problem_type must be one of {PROBLEM_TYPES} or null, got "
                                 f"{self.problem_type!r}")
            self.problem_type = ProblemType(self.problem_type)
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(f"config field id2label must have the keys 0..{self.num_labels - 1}, got {sorted(self.id2label)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"config field {name} ({value}) is outside the vocabulary (size {self.vocab_size})")

    # -- (de)serialization --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PersimmonConfig":
        """Build from a config.json dict in the Hub (4.37) or transformers 5.x layout."""
        raw = dict(raw)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raw["eos_token_id"] = eos[0] if eos else None  # some configs list several; the first is the primary
        for name, value in raw.items():
            problem = _type_problem(name, value)
            if problem:
                raise ValueError(problem)
        if raw.get("model_type", "persimmon") != "persimmon":
            raise ValueError(f"config field model_type is {raw['model_type']!r}, not 'persimmon'")
        if "rope_parameters" in raw:  # transformers 5.x
            params = dict(raw.pop("rope_parameters") or {})
            kind = params.pop("rope_type", params.pop("type", "default"))
            if "rope_theta" in params:
                raw["rope_theta"] = params.pop("rope_theta")
            if "partial_rotary_factor" in params:
                raw["partial_rotary_factor"] = params.pop("partial_rotary_factor")
            if kind != "default":
                raw["rope_scaling"] = {"type": kind, **params}
            elif params:
                raise ValueError(f"config field rope_parameters has unknown keys {sorted(params)} for rope_type 'default'")
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        raw.pop("dtype", None)
        for name in ("rope_theta", "partial_rotary_factor", "torch_dtype"):  # from rope_parameters / dtype
            problem = _type_problem(name, raw.get(name))
            if name in raw and problem:
                raise ValueError(problem)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k not in _IGNORED_KEYS}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PersimmonConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self, architecture: str | None = None) -> dict[str, Any]:
        """The Hub (4.37) layout, which transformers 4.37 and 5.x both read."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = "persimmon"
        if architecture is not None:
            out["architectures"] = [architecture]
        out.update(self.extra)
        return dict(sorted(out.items()))

    def save_pretrained(self, path: str | os.PathLike, architecture: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(architecture), indent=2) + "\n")
