"""What a checkpoint directory holds, read without torch: its weight files, the tensor names and dtypes in
their safetensors headers, its heads. The job driver and the CLI plan with these and never load torch."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.model", "adept_vocab.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
VOCAB_FILES = ("tokenizer.model", "adept_vocab.model")  # what the tokenizer loads, in its order of preference
# safetensors dtype codes of floating tensors -> torch dtype names
FLOAT_CODES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the requested model; the message says why."""


def weight_files(path: Path, allow_pickle: bool = False) -> tuple[list[Path], bool]:
    """The weight files of a checkpoint directory and whether they are pickles, preferring safetensors."""
    files, pickled, _ = weight_sources(path, allow_pickle)
    return files, pickled


def weight_sources(path: Path, allow_pickle: bool = False) -> tuple[list[Path], bool, dict[str, set[str]] | None]:
    """weight_files plus, for an indexed checkpoint, the tensor names the index assigns to each file (by file
    name). The index is the authority: a file may hold more tensors than it is assigned (a head trained on
    a linked base model: the base's files still carry its lm_head, the index maps score.weight elsewhere)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    for index_name, single_name, pickled in ((SAFE_INDEX, SAFE_WEIGHTS, False), (PICKLE_INDEX, PICKLE_WEIGHTS, True)):
        assigned = None
        if (path / single_name).is_file():
            files = [path / single_name]
        elif (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path / index_name} is not a valid shard index: {exc!r}") from exc
            files = [path / name for name in sorted(set(weight_map.values()))]
            assigned = {}
            for key, name in weight_map.items():
                assigned.setdefault(name, set()).add(key)
            broken = [f for f in files if f.is_symlink() and not f.exists()]
            if broken:  # a train-head checkpoint links its base's weight files
                raise CheckpointError(f"{broken[0]} links to {os.readlink(broken[0])}, which is gone: this "
                                      "checkpoint uses the weight files of a base model that was moved or removed; "
                                      "put it back there (or retrain the head on its new path)")
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path / index_name} names shard files that are missing: {missing}")
        else:
            continue
        if pickled and not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickled weights ({files[0].name}); pickles can run code when read. "
                "Convert them to safetensors, or pass allow_pickle=True to read them with weights_only=True"
            )
        return files, pickled, assigned
    raise CheckpointError(f"no weights in {path}: expected {SAFE_WEIGHTS} or {SAFE_INDEX}")


def safetensors_header(file: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} from a safetensors file's JSON header (no tensor is read)."""
    try:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"cannot read {file}: not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header


def tensor_names(files: list[Path], pickled: bool, assigned: dict[str, set[str]] | None = None) -> set[str]:
    """Every tensor name the checkpoint offers (for an indexed one: what its index assigns)."""
    if assigned is not None:
        return set().union(*assigned.values())
    if pickled:
        import torch

        return {k for f in files for k in torch.load(f, map_location="meta", weights_only=True, mmap=True)}
    return {name for file in files for name in safetensors_header(file)}


def stored_dtype_name(files: list[Path], pickled: bool) -> str:
    """dtype of the first floating tensor of the first file, for dtype='auto' when config.json does not say."""
    if pickled:
        import torch

        state = torch.load(files[0], map_location="meta", weights_only=True, mmap=True)
        return next((str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()), "float32")
    for entry in safetensors_header(files[0]).values():
        if entry.get("dtype") in FLOAT_CODES:
            return FLOAT_CODES[entry["dtype"]]
    return "float32"


def target_dtype_name(config, files: list[Path], pickled: bool, dtype) -> str:
    """The dtype a load gives, by name: "auto" = config.json's torch_dtype, else the stored one; None =
    float32; otherwise the one named."""
    from .config import canonical_dtype

    if dtype == "auto":
        return config.torch_dtype or stored_dtype_name(files, pickled)
    return canonical_dtype(dtype) or "float32"


def load_dtype(path: str | Path, dtype="auto", allow_pickle: bool = False) -> str:
    """The name of the dtype `from_pretrained(path, dtype=dtype)` would give ("auto" resolved), without
    loading weights: a job asking for "auto" and one naming the checkpoint's own dtype are the same job."""
    from .config import PersimmonConfig

    path = Path(path)
    files, pickled = weight_files(path, allow_pickle)
    return target_dtype_name(PersimmonConfig.from_pretrained(path) if dtype == "auto" else None, files, pickled, dtype)


def checkpoint_heads(path: Path, allow_pickle: bool = False) -> set[str]:
    """Which heads a checkpoint carries ("lm_head", "score"), from tensor names only (no weights are read)."""
    files, pickled, assigned = weight_sources(Path(path), allow_pickle)
    keys = tensor_names(files, pickled, assigned)
    return {head for head in ("lm_head", "score") if f"{head}.weight" in keys}


def model_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The files a load of this checkpoint reads: config.json, the tokenizer, the weight files and their index.
    What else sits in the folder (a model card, train-head's metrics.json, a lease) is not the model."""
    path = Path(path)
    files, _, assigned = weight_sources(path, allow_pickle)
    found = [path / "config.json", *files]
    found += [path / name for name in VOCAB_FILES if (path / name).is_file()][:1]
    if assigned is not None:
        found += [path / name for name in (SAFE_INDEX, PICKLE_INDEX) if (path / name).is_file()][:1]
    return sorted(set(found), key=lambda p: p.name)


def check_config_fits(config, path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a config.json that does not describe the weights beside it (layer count, vocabulary and hidden
    sizes from the safetensors headers), before a model of its size is built: a `num_hidden_layers` of
    100000 over a 4-layer checkpoint is a typo to report in a second, not a build to run out of memory on."""
    files, pickled, assigned = weight_sources(Path(path), allow_pickle)
    if pickled:
        return
    shapes: dict[str, list[int]] = {}
    for file in files:
        wanted = assigned.get(file.name) if assigned is not None else None
        for name, entry in safetensors_header(file).items():
            if wanted is None or name in wanted:
                shapes[name] = entry.get("shape", [])
    layers = {int(m.group(1)) for m in (_LAYER.match(n) for n in shapes) if m}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(f"config.json of {path} says num_hidden_layers {config.num_hidden_layers}, but its "
                              f"weights hold {max(layers) + 1} layers")
    embed = next((shapes[n] for n in ("model.embed_tokens.weight", "embed_tokens.weight") if n in shapes), None)
    if embed is not None and list(embed) != [config.vocab_size, config.hidden_size]:
        raise CheckpointError(f"config.json of {path} says vocab_size {config.vocab_size} and hidden_size "
                              f"{config.hidden_size}, but the weights' embedding is {list(embed)}")
