"""Adept's release checkpoint (the Megatron-style tar contents) -> a HF-layout directory with safetensors.

The release holds `iter_*/mp_rank_00/model_optim_rng.pt` (a pickle whose "model" entry is a nested dict of
tensors) and `adept_vocab.model` (the sentencepiece vocabulary). The state dict is flattened with dots and
renamed by substring (the key map below, as in the reference conversion); `rotary_emb.inv_freq` is dropped.
The config is read off the tensors' shapes and, where the pickle carries them, the training arguments.

The pickle is read with `weights_only=True`: objects it references that are not tensors or plain containers
(Megatron's argument enums, optimizer classes) come back as inert stand-ins, so no code from the file runs.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import PersimmonConfig, resolve_dtype
from .model import PersimmonForCausalLM

CHECKPOINT_NAME = "model_optim_rng.pt"
RELEASE_VOCAB = ("adept_vocab.model", "tokenizer.model")  # what a release tar names its vocabulary, in order
END_OF_TEXT = "|ENDOFTEXT|"

# release key substring -> HF key substring, applied in this order
KEY_MAP = (
    ("self_attention", "self_attn"),
    ("language_model.encoder", "model"),
    ("word_embeddings_for_head", "lm_head"),
    ("language_model.embedding.word_embeddings", "model.embed_tokens"),
    ("language_model.output_layer", "lm_head"),  # later Megatron versions' name for the untied head
)
DROPPED = "rotary_emb.inv_freq"


class ConversionError(ValueError):
    """A release directory that cannot be converted; the message says what is missing or wrong."""


class _StandIn:
    """Takes the place of any non-tensor class the release pickle names; keeps its arguments, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def find_release_checkpoint(release_dir: Path) -> Path:
    """The model_optim_rng.pt of the latest iteration (or the file itself when given)."""
    if release_dir.is_file():
        return release_dir
    candidates = sorted(release_dir.rglob(f"iter_*/mp_rank_00/{CHECKPOINT_NAME}"))
    if not candidates:
        candidates = sorted(release_dir.rglob(CHECKPOINT_NAME))
    if not candidates:
        raise ConversionError(f"no iter_*/mp_rank_00/{CHECKPOINT_NAME} under {release_dir}")

    def iteration(path: Path) -> int:
        match = re.search(r"iter_(\d+)", str(path))
        return int(match.group(1)) if match else -1

    return max(candidates, key=iteration)


def find_vocab(release_dir: Path) -> Path | None:
    root = release_dir if release_dir.is_dir() else release_dir.parent
    for name in RELEASE_VOCAB:
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    return None


def load_release_pickle(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True, every non-allowlisted global mapped to an inert stand-in."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stand_ins = [
        (argparse.Namespace, name) if name == "argparse.Namespace"
        else (type(name.rsplit(".", 1)[-1], (_StandIn,), {"__module__": __name__}), name)
        for name in names
    ]
    with torch.serialization.safe_globals(stand_ins):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ConversionError(f"{path} has no 'model' state dict (top-level keys: {list(checkpoint)[:10]})")
    return checkpoint


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """{'a': {'b': t}} -> {'a.b': t}; non-tensor leaves (Megatron keeps some) are skipped."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def rename_keys(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in flat.items():
        if DROPPED in key:
            continue
        for old, new in KEY_MAP:
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


def infer_config(state: dict[str, torch.Tensor], args: Any = None, vocab: Path | None = None) -> PersimmonConfig:
    """The config that fits these tensors: shapes first, then the training args, then the 8B defaults."""
    def arg(name: str, default: Any) -> Any:
        value = getattr(args, name, None) if isinstance(args, argparse.Namespace) else None
        return default if value is None else value

    try:
        vocab_size, hidden = state["model.embed_tokens.weight"].shape
        intermediate = state["model.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    except KeyError as exc:
        raise ConversionError(f"release state dict lacks {exc.args[0]} after renaming; keys: {sorted(state)[:8]}...") from None
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    q_norm = state.get("model.layers.0.self_attn.q_layernorm.weight")
    heads = hidden // q_norm.shape[0] if q_norm is not None else arg("num_attention_heads", None)
    if heads is None:
        raise ConversionError("cannot tell the number of attention heads: no q_layernorm and no args in the checkpoint")
    bos = eos = 71013 if vocab_size > 71013 else None
    if vocab is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(vocab))
        end = sp.piece_to_id(END_OF_TEXT)
        if end != sp.unk_id():
            bos = eos = end
        else:
            bos, eos = (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)
    return PersimmonConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=arg("max_position_embeddings", arg("seq_length", 16384)),
        rope_theta=float(arg("rotary_emb_base", 25000.0)),
        partial_rotary_factor=float(arg("rotary_percent", 0.5)),
        qk_layernorm=q_norm is not None,
        layer_norm_eps=float(arg("layernorm_epsilon", 1e-5)),
        bos_token_id=bos,
        eos_token_id=eos,
        torch_dtype="bfloat16",
    )


def convert_release(
    release_dir: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    config: PersimmonConfig | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert a release to `out_dir` (config.json, model*.safetensors, tokenizer.model). Returns out_dir.
    dtype: what to store; the release was trained in bf16, which is the default."""
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    checkpoint = load_release_pickle(find_release_checkpoint(release_dir))
    state = rename_keys(flatten(checkpoint["model"]))
    vocab = find_vocab(release_dir)
    config = config or infer_config(state, checkpoint.get("args"), vocab)
    target = resolve_dtype(dtype)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ConversionError(f"release keys do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [f"{k}: release {tuple(state[k].shape)} vs model {shapes[k]}" for k in shapes if tuple(state[k].shape) != shapes[k]]
    if wrong:
        raise ConversionError("release tensors do not fit the inferred config: " + "; ".join(wrong[:8]))
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if vocab is not None:
        shutil.copyfile(vocab, out_dir / "tokenizer.model")
    return out_dir
