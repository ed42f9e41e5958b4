"""SentencePiece tokenizer for Llama 1 / Llama 2 `tokenizer.model` files.

Same surface as the Llama 3 `herd.text.tokenizer.Tokenizer` (`vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`stop_ids`, `special_tokens`, `encode`, `decode`, `token_to_id`) so training and generation code does not
care which family a checkpoint belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm


class SentencePieceTokenizer:
    """A SentencePiece model (Llama 1/2: 32000 pieces, `<unk>`=0, `<s>`=1, `</s>`=2, byte fallback).

    Attributes:
        vocab_size: number of pieces in the model.
        bos_id / eos_id: the model's own BOS / EOS ids (1 / 2 for Llama 2).
        pad_id: the model's pad id, which is -1 ("no pad piece") for Meta's Llama 1/2 files. -1 is not a
            valid token: callers padding a batch must pick a filler id themselves and mask it out.
        stop_ids: {eos_id}; Llama 2 chat has no separate end-of-turn token.
        special_tokens: control and unknown pieces → ids (e.g. {"<unk>": 0, "<s>": 1, "</s>": 2}).

    Unlike the tiktoken tokenizer, `encode` never turns text such as "<s>" into a control id: SentencePiece
    does not match control symbols in input text, so there are no allowed/disallowed special arguments.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {self.path}")
        self.model = spm.SentencePieceProcessor()
        try:
            self.model.Load(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path} is not a readable SentencePiece model: {exc}") from exc
        self.vocab_size: int = self.model.vocab_size()
        self.bos_id: int = self.model.bos_id()
        self.eos_id: int = self.model.eos_id()
        self.pad_id: int = self.model.pad_id()
        if self.eos_id < 0:
            # Without an EOS piece generation could never stop on its own.
            raise ValueError(f"SentencePiece model {self.path} defines no EOS piece (eos_id=-1)")
        self.stop_ids: frozenset[int] = frozenset({self.eos_id})
        self.special_tokens: dict[str, int] = {
            self.model.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.model.is_control(i) or self.model.is_unknown(i)
        }

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `s`, optionally with the model's BOS prepended / EOS appended."""
        if not isinstance(s, str):
            raise TypeError(f"SentencePieceTokenizer.encode expects a str, got {type(s).__name__}")
        if bos and self.bos_id < 0:
            raise ValueError(f"SentencePiece model {self.path} defines no BOS piece, cannot add one")
        ids: list[int] = self.model.encode(s)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (BOS/EOS) decode to nothing, byte pieces are reassembled."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            # sentencepiece raises a bare IndexError-like error without the id; name it.
            raise ValueError(
                f"ids {bad[:5]} are outside the vocabulary of {self.path} (size {self.vocab_size})"
            )
        return self.model.decode(list(ids))

    def token_to_id(self, token: str) -> int:
        """Id of one piece given as its text (SentencePiece writes spaces as '▁', e.g. '▁the')."""
        idx = self.model.piece_to_id(token)
        # piece_to_id maps every unknown string to the <unk> id; only the <unk> piece itself may return it.
        if self.model.is_unknown(idx) and token != self.model.id_to_piece(idx):
            raise KeyError(f"{token!r} is not a piece of {self.path}")
        return idx
