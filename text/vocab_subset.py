"""A tokenizer restricted to the token ids a corpus uses, renumbered densely (vocabulary trimming).

The Llama 3 vocabulary has 128,256 entries; for a tiny model trained on a small corpus on a CPU the
embedding and output matrices (and their AdamW state) dominate the step time by ~50×. This wraps the
*real* tokenizer: text is split exactly as Llama 3 splits it, then each id is mapped to its index in
`keep_ids` (all special tokens are always kept). Saved next to a checkpoint as `vocab_subset.json`,
so `load_tokenizer` rebuilds the same mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SUBSET_FILE = "vocab_subset.json"  # beside a checkpoint trained on a trimmed vocabulary


class SubsetTokenizer:
    def __init__(
        self, base: Any, keep_ids: Sequence[int], unk_token: str = "<|reserved_special_token_0|>"
    ) -> None:
        keep = sorted(set(int(i) for i in keep_ids) | set(base.special_tokens.values()))
        self.base = base
        self.keep_ids = keep  # subset id → base id
        self._to_subset = {b: s for s, b in enumerate(keep)}
        self.unk_id = self._to_subset[base.special_tokens[unk_token]]
        self.special_tokens = {name: self._to_subset[i] for name, i in base.special_tokens.items()}
        self.bos_id = self._to_subset[base.bos_id]
        self.eos_id = self._to_subset[base.eos_id]
        self.pad_id = self._to_subset[base.pad_id] if base.pad_id >= 0 else -1
        self.stop_ids = frozenset(self._to_subset[i] for i in base.stop_ids)
        self.unknown_count = 0  # base tokens outside the subset seen by `encode` (mapped to unk)

    @classmethod
    def from_texts(cls, base: Any, texts: Iterable[str]) -> SubsetTokenizer:
        used: set[int] = set()
        for text in texts:
            used.update(base.encode(text, bos=False, eos=False))
        return cls(base, sorted(used))

    @property
    def vocab_size(self) -> int:
        return len(self.keep_ids)

    def encode(self, s: str, bos: bool = False, eos: bool = False, **kwargs: Any) -> list[int]:
        out = []
        for i in self.base.encode(s, bos=bos, eos=eos, **kwargs):
            sub = self._to_subset.get(i)
            if sub is None:
                self.unknown_count += 1
                sub = self.unk_id
            out.append(sub)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids past the subset (the model's padding rows, which an undertrained model can sample)
        decode as the unknown token rather than raising."""
        n = len(self.keep_ids)
        return self.base.decode([self.keep_ids[i if 0 <= i < n else self.unk_id] for i in ids])

    def token_to_id(self, token: str) -> int:
        return self._to_subset[self.base.token_to_id(token)]

    def to_base_ids(self, ids: Sequence[int]) -> list[int]:
        return [self.keep_ids[i] for i in ids]

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SUBSET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"base": "llama3", "keep_ids": self.keep_ids}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, base: Any) -> SubsetTokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            keep = data["keep_ids"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: not a valid vocabulary subset file ({type(e).__name__}: {e})") from e
        if not all(isinstance(i, int) and 0 <= i < base.vocab_size for i in keep):
            raise ValueError(f"{path}: keep_ids must be token ids below {base.vocab_size}")
        tok = cls(base, keep)
        if tok.keep_ids != sorted(set(keep)):
            raise ValueError(f"{path}: keep_ids do not include every special token of the base tokenizer")
        return tok
