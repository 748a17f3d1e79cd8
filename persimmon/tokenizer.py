"""PersimmonTokenizer: Adept's sentencepiece vocabulary (Unigram with byte fallback) and batch encoding.

Ids are sentencepiece's own; BOS is prepended by default. The special ids come from the model's
config.json when it sits beside the vocabulary (the real checkpoints use 71013 `|ENDOFTEXT|` for both BOS
and EOS and have no pad id), else from the vocabulary itself. Batches pad with the pad id, or with a
harmless id when the model has none: the attention mask, not the pad id, is what marks padding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from .files import VOCAB_FILES
END_OF_TEXT = "|ENDOFTEXT|"


@dataclass
class Encoded:
    """One text's ids after truncation, and whether truncation removed anything."""

    ids: list[int]
    truncated: bool


class PersimmonTokenizer:
    def __init__(
        self,
        model_file: str | os.PathLike,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        end = self.sp.piece_to_id(END_OF_TEXT)
        end = None if end == self.sp.unk_id() else end
        own_bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        own_eos = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_token_id = bos_token_id if bos_token_id is not None else (end if end is not None else own_bos)
        self.eos_token_id = eos_token_id if eos_token_id is not None else (end if end is not None else own_eos)
        self.pad_token_id = pad_token_id
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary of {self.model_file} (size {self.vocab_size})")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PersimmonTokenizer":
        """Load tokenizer.model (or Adept's adept_vocab.model) from a checkpoint directory, with the special ids
        of the config.json beside it."""
        path = Path(path)
        if path.is_file():
            file, folder = path, path.parent
        else:
            file = next((path / n for n in VOCAB_FILES if (path / n).is_file()), None)
            folder = path
            if file is None:
                raise FileNotFoundError(f"no tokenizer in {path}: expected one of {list(VOCAB_FILES)}")
        ids = {}
        config = folder / "config.json"
        if config.is_file():
            raw = json.loads(config.read_text())
            ids = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            if isinstance(ids["eos_token_id"], list):
                ids["eos_token_id"] = ids["eos_token_id"][0] if ids["eos_token_id"] else None
        return cls(file, **ids)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None}

    @property
    def padding_id(self) -> int:
        """The id written into padded positions: the pad id, else EOS, else 0; masked out either way."""
        for candidate in (self.pad_token_id, self.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i not in special and not self.sp.is_control(i)]
            return self.sp.decode(ids)
        # keep special tokens visible: decode the runs between them and splice their pieces in
        out, run = [], []
        for i in ids:
            if i in self.special_ids or self.sp.is_control(i):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it reads after other text and a space (e.g. a label after "Answer:"): sentencepiece
        models that add a dummy prefix space already write it; the others need it spelled out."""
        dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")
        return self.sp.encode(text if dummy_prefix else " " + text)

    def encode_truncated(
        self, text: str, max_length: int | None = None, truncation_side: str = "right", add_bos: bool = True
    ) -> Encoded:
        """Encode and cut to max_length tokens. Left truncation keeps BOS and the last tokens (the recent end of
        a prompt); right truncation keeps the first tokens."""
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        ids = self.encode(text, add_bos=add_bos)
        if max_length is None or len(ids) <= max_length:
            return Encoded(ids, False)
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if truncation_side == "right":
            return Encoded(ids[:max_length], True)
        keep_bos = add_bos and self.bos_token_id is not None and max_length > 1
        head = ids[:1] if keep_bos else []
        return Encoded(head + ids[len(ids) - (max_length - len(head)):], True)

    def pad(self, rows: list[list[int]], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to one length -> (input_ids, attention_mask), LongTensors of shape (B, T)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.padding_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            sl = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, sl] = torch.tensor(row, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    def batch(
        self,
        texts: list[str],
        padding_side: str = "left",
        max_length: int | None = None,
        truncation_side: str = "right",
        add_bos: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate and pad texts -> (input_ids, attention_mask). Left padding is what generation wants."""
        rows = [self.encode_truncated(t, max_length, truncation_side, add_bos).ids for t in texts]
        return self.pad(rows, padding_side)

    @staticmethod
    def chat_prompt(prompt: str, history: list[tuple[str, str]] | None = None) -> str:
        """Persimmon-8B-chat's format: "human: {prompt}\\n\\nadept:", earlier (prompt, answer) turns first."""
        turns = "".join(f"human: {q}\n\nadept: {a}\n\n" for q, a in history or [])
        return f"{turns}human: {prompt}\n\nadept:"
