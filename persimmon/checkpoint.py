"""Reading and writing HF-format Persimmon checkpoints: config.json plus safetensors weights.

Loading builds the model on the meta device and assigns the tensors read from memory-mapped safetensors
files, so an 8B model is never materialised twice. Key names are the checkpoint's own; a base model loads
from a causal-LM or classifier checkpoint (its `model.` prefix stripped), never the other way round.
Pickled `pytorch_model*.bin` files are read only on explicit opt-in, and then with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PersimmonConfig, dtype_name, resolve_dtype
from .files import (SAFE_INDEX, SAFE_WEIGHTS, CheckpointError, checkpoint_heads, load_dtype,  # noqa: F401 (API)
                    TOKENIZER_FILES, stored_dtype_name, target_dtype_name, tensor_names, weight_files,
                    weight_sources, check_config_fits)

_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # non-persistent buffer some old exports carry


@contextlib.contextmanager
def _no_init():
    """torch's modules initialise their parameters as they are built; on the meta device that is wasted, and
    its first normal_() imports torch._dynamo (1.5 s on a small machine): skip it while a model is built there."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _read_tensors(files: list[Path], pickled: bool, device: str, assigned: dict[str, set[str]] | None = None):
    """Yield (name, tensor) from every weight file (only the names the index assigns to it, when there is
    one); safetensors are memory-mapped and read one tensor at a time."""
    for file in files:
        keep = None if assigned is None else assigned.get(file.name, set())
        if pickled:
            state = torch.load(file, map_location=device, weights_only=True, mmap=True)
            yield from ((k, v) for k, v in state.items() if keep is None or k in keep)
            continue
        with _open_safetensors(file, device) as f:
            for name in f.keys():
                if keep is None or name in keep:
                    yield name, f.get_tensor(name)


def _open_safetensors(file: Path, device: str = "cpu"):
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def _stored_dtype(files: list[Path], pickled: bool) -> torch.dtype:
    """dtype of the first floating tensor, for dtype='auto' when config.json does not say."""
    return resolve_dtype(stored_dtype_name(files, pickled))


def _target_dtype(config: PersimmonConfig, files: list[Path], pickled: bool, dtype) -> torch.dtype:
    return resolve_dtype(target_dtype_name(config, files, pickled, dtype))


def _key_mapper(expected: set[str], found: set[str]):
    """Map checkpoint key -> model key, bridging a base model and a checkpoint with heads (`model.` prefix)."""
    model_prefixed = any(k.startswith("model.") for k in expected)
    ckpt_prefixed = any(k.startswith("model.") for k in found)
    if ckpt_prefixed and not model_prefixed:  # base model from a CausalLM / classifier checkpoint: drop the heads
        return lambda k: k[len("model."):] if k.startswith("model.") else None
    if model_prefixed and not ckpt_prefixed:  # head model from a base-model checkpoint: its head will be missing
        return lambda k: "model." + k
    return lambda k: k


def load_checkpoint(
    cls,
    path: Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    config: PersimmonConfig | None = None,
):
    config = config if config is not None else PersimmonConfig.from_pretrained(path)
    files, pickled, assigned = weight_sources(path, allow_pickle)
    check_config_fits(config, path, allow_pickle)  # before a model of the config's size is built
    target = _target_dtype(config, files, pickled, dtype)
    device = torch.device(device)
    with torch.device("meta"), _no_init():
        model = cls(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    if tied:
        expected.pop("lm_head.weight")

    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    mapper = _key_mapper(set(expected), tensor_names(files, pickled, assigned))
    load_device = "cpu" if pickled else str(device)
    for name, tensor in _read_tensors(files, pickled, load_device, assigned):
        if _IGNORED_KEYS.search(name):
            continue
        key = mapper(name)
        if key is None:
            continue
        if key not in expected:
            if not (tied and key == "lm_head.weight"):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[key]):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key])}")
            continue
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        state[key] = tensor.to(device)
    missing = sorted(set(expected) - set(state))
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        problems.append("missing tensors: " + ", ".join(f"{k} {tuple(expected[k])}" for k in missing[:10])
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)[:10])
                        + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    if problems:
        hint = _head_hint(cls, set(state) | set(unexpected))
        raise CheckpointError(f"cannot load {path} into {cls.__name__}: " + " | ".join(problems) + hint)
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _head_hint(cls, keys: set[str]) -> str:
    if "lm_head.weight" in keys and cls.__name__ == "PersimmonForSequenceClassification":
        return " (this is a causal-LM checkpoint: load it with PersimmonForCausalLM, or fine-tune a classifier head)"
    if "score.weight" in keys and cls.__name__ == "PersimmonForCausalLM":
        return " (this is a sequence-classification checkpoint: load it with PersimmonForSequenceClassification)"
    return ""


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000; an int is bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def save_checkpoint(model, path: Path, max_shard_size: int | str = "5GB") -> None:
    limit = parse_size(max_shard_size)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the tie is in the config
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [*path.glob("model*.safetensors"), path / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    model.config.torch_dtype = dtype_name(model.dtype)
    model.config.save_pretrained(path, architecture=model.architecture)
    if len(shards) == 1:
        _atomic_save(shards[0], path / SAFE_WEIGHTS)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, path / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_text(path / SAFE_INDEX, json.dumps(index, indent=2) + "\n")


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's are private: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(file: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.fchmod(fd, _umask_mode())
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, file)



HEAD_WEIGHTS = "score.safetensors"
HEAD_KEYS = ("lm_head.weight", "score.weight")


def save_with_head(base: str | Path, path: str | Path, weight: torch.Tensor, id2label: dict[int, str],
                   problem_type: str) -> list[str]:
    """Write `path` as a PersimmonForSequenceClassification checkpoint: the base's config with these labels,
    the base's tensors (minus its heads) through an index whose files are symbolic links to the base's own
    (nothing copied), `score.weight` (num_labels, hidden) in score.safetensors, and the base's tokenizer.
    transformers' from_pretrained and ours both load it. A base file that carries an old `score.weight` is
    rewritten without it (transformers reads whole files, and the old head would clash with the new one).
    Returns notes on what was done (for the user)."""
    base, path = Path(base).resolve(), Path(path)
    files, pickled, assigned = weight_sources(base)
    if pickled:
        raise CheckpointError(f"{base} holds pickled weights; convert them to safetensors first")
    config = json.loads((base / "config.json").read_text())
    hidden = config.get("hidden_size")
    if tuple(weight.shape) != (len(id2label), hidden):
        raise ValueError(f"head weight has shape {tuple(weight.shape)}; expected ({len(id2label)}, {hidden})")
    stored = _stored_dtype(files, pickled)
    path.mkdir(parents=True, exist_ok=True)
    notes, weight_map, total = [], {}, 0
    for file in files:
        with _open_safetensors(file) as f:
            present = set(f.keys())
            keys = [k for k in (assigned.get(file.name, set()) if assigned is not None else present)
                    if k not in HEAD_KEYS and not _IGNORED_KEYS.search(k)]
            if not keys:
                continue
            name = "base.safetensors" if file.name == SAFE_WEIGHTS else file.name  # an index, not a single file
            if "score.weight" in present:
                # a copy, named after the file it came from: a checkpoint that links this copy (a head trained
                # on top of this one) finds it gone, never silently replaced, if this one is retrained from
                # another base
                st = file.resolve().stat()
                source = hashlib.sha256(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
                name = f"{Path(name).stem}-{source[:12]}.safetensors"
                _atomic_save({k: f.get_tensor(k).contiguous() for k in keys}, path / name)
                notes.append(f"{file.name} of the base holds its old head: written here without it (a copy, "
                             "not a link)")
            else:
                (path / name).symlink_to(file.resolve())
            for k in keys:
                weight_map[k] = name
                total += math.prod(f.get_slice(k).get_shape()) * stored.itemsize
    _atomic_save({"score.weight": weight.detach().to("cpu", stored).contiguous()}, path / HEAD_WEIGHTS)
    weight_map["score.weight"] = HEAD_WEIGHTS
    total += weight.numel() * stored.itemsize
    index = {"metadata": {"total_size": total, "base_model": str(base)}, "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_text(path / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
    config.update(architectures=["PersimmonForSequenceClassification"], problem_type=problem_type,
                  id2label={str(i): label for i, label in id2label.items()},
                  label2id={label: i for i, label in id2label.items()})
    config.pop("num_labels", None)  # transformers derives it from id2label
    _atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, path / name)
    return notes
