"""The Llama 3 tokenizer (tiktoken BPE) and `load_tokenizer`, which picks the right tokenizer for a checkpoint.

The Llama 3 vocabulary is 128,000 byte-level BPE tokens followed by 256 special tokens (ids 128000-128255).
The special tokens, their order and the pre-tokenization regex follow Meta's `llama_models.llama3.tokenizer`
exactly, so token ids are interchangeable with Meta's checkpoints and tooling.

Every tokenizer in herd (this one and `herd.text.sp_tokenizer.SentencePieceTokenizer`) exposes the same
surface: `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `stop_ids`, `special_tokens`, `encode`, `decode` and
`token_to_id`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from herd.text.vocab_subset import SUBSET_FILE, SubsetTokenizer

if TYPE_CHECKING:
    from herd.text.sp_tokenizer import SentencePieceTokenizer

# Pre-tokenization regex of Llama 3 (contractions, letter runs, 1-3 digit groups, punctuation, whitespace).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
LLAMA3_VOCAB_SIZE = 128_256

# The named special tokens, in id order starting right after the BPE ranks; the rest of the 256 slots are
# `<|reserved_special_token_{2..245}|>`.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model stops to let a tool run, the turn goes on afterwards
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",  # the message body is a tool call
    "<|image|>",
)

# tiktoken's Rust core panics on inputs much longer than this, so long strings are encoded in chunks.
MAX_ENCODE_CHARS = 400_000
# Runs of whitespace (or of non-whitespace) longer than this make the BPE quadratic
# (https://github.com/openai/tiktoken/issues/195); they are cut into pieces of this length.
MAX_RUN_CHARS = 25_000

# Matches every maximal run of whitespace or of non-whitespace. Python's `\s` and `str.isspace` share one
# definition of whitespace (Py_UNICODE_ISSPACE), so the cut points are the ones Meta's per-character loop finds.
_RUN_RE = re.compile(r"\s+|\S+")

# A tiktoken BPE file is lines of "<base64 token> <rank>".
_TIKTOKEN_LINE_RE = re.compile(rb"\s*[A-Za-z0-9+/]+={0,2} \d+(?:\r?\n|$)")

SpecialArg = Literal["all"] | Collection[str]


def default_tokenizer_path() -> Path:
    """Path of the Llama 3 `tokenizer.model` shipped inside the installed `llama_models` package."""
    # find_spec locates the package without importing it (llama_models' modules pull in heavy dependencies).
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default Llama 3 tokenizer lives in the `llama_models` package, which is not installed "
            "(pip install llama-models), or pass the path of a tokenizer.model"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llama_models is installed at {list(spec.submodule_search_locations)} but has no llama3/tokenizer.model"
    )


def _split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut `text` so that no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    A run of length L starting at `a` is cut at a + max_run, a + 2*max_run, ... exactly like Meta's
    `_split_whitespaces_or_nonwhitespaces`; pieces otherwise span several runs.
    """
    if len(text) <= max_run:  # the common case: no run can be too long
        yield text
        return
    start = 0
    for run in _RUN_RE.finditer(text):
        run_start, run_end = run.span()
        for cut in range(run_start + max_run, run_end, max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer:
    """Llama 3 tiktoken tokenizer.

    Args:
        path: a tiktoken BPE file ("<base64 token> <rank>" per line). None → the Llama 3 `tokenizer.model`
            from the installed `llama_models` package.

    Attributes:
        vocab_size: number of BPE ranks + 256 special tokens (128256 for Llama 3).
        bos_id / eos_id: `<|begin_of_text|>` / `<|end_of_text|>`.
        pad_id: `<|finetune_right_pad_id|>` (128004 for Llama 3), the token Meta pads fine-tuning batches
            with. It is a real vocabulary id (never -1), so padded positions must still be masked out of the
            loss and attention.
        stop_ids: tokens that end generation: `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`.
        special_tokens: all 256 special token strings → ids.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_tokenizer_path()
        ranks = _load_ranks(self.path)
        num_base = len(ranks)
        names = list(_NAMED_SPECIAL_TOKENS)
        names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(names))]
        self.special_tokens: dict[str, int] = {name: num_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size: int = num_base + NUM_SPECIAL_TOKENS
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids: frozenset[int] = frozenset({self.eos_id, self.eom_id, self.eot_id})

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        s: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: SpecialArg = (),
        disallowed_special: SpecialArg = (),
    ) -> list[int]:
        """Token ids of `s`, optionally framed by `<|begin_of_text|>` / `<|end_of_text|>`.

        Special-token strings inside `s` are plain text by default (so user text cannot inject a
        `<|eot_id|>`). `allowed_special` ("all" or a set of token strings) turns them into their special ids;
        `disallowed_special` ("all" or a set) makes their presence raise ValueError instead. Inputs of any
        length work: they are encoded in 400k-character chunks and runs longer than 25k characters of
        whitespace / non-whitespace are cut, at the same places Meta's tokenizer cuts them.
        """
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        ids: list[int] = [self.bos_id] if bos else []
        for offset in range(0, max(len(s), 1), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[offset : offset + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(
                    self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special)
                )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens decode to their strings, invalid UTF-8 to U+FFFD."""
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            # tiktoken reports these as a bare KeyError / OverflowError without saying which vocabulary.
            bad = [i for i in ids if not 0 <= i < self.vocab_size][:5]
            raise ValueError(f"ids {bad} are outside the vocabulary of {self.path} (size {self.vocab_size})")
        return self.model.decode(ids)

    def token_to_id(self, token: str) -> int:
        """Id of one token given as its text: a special token string or the UTF-8 text of one BPE token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.model.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise KeyError(f"{token!r} is not a single token of {self.path}") from None


def _load_ranks(path: Path) -> dict[bytes, int]:
    """BPE ranks of a tiktoken file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model file not found: {path}")
    data = path.read_bytes()
    if not _TIKTOKEN_LINE_RE.match(data[:1024]):
        hint = " (it looks like a SentencePiece model: use load_tokenizer)" if data[:1] == b"\x0a" else ""
        raise ValueError(
            f"{path} is not a tiktoken BPE file: expected lines of '<base64 token> <rank>', "
            f"file starts with {data[:32]!r}{hint}"
        )
    # tiktoken caches files by their path alone; passing the content hash makes it re-read a file that was
    # replaced at the same path instead of serving the stale cached copy.
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as exc:
        raise ValueError(f"{path} is a malformed tiktoken BPE file: {exc}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        # Special tokens get ids right after the last rank, so ranks must be exactly 0..n-1 and unique.
        raise ValueError(f"{path}: BPE ranks are not the unique integers 0..{len(ranks) - 1}")
    return ranks


def detect_tokenizer_format(path: str | os.PathLike[str]) -> Literal["tiktoken", "sentencepiece"]:
    """Tell a tiktoken BPE file (text lines "<base64> <rank>") from a SentencePiece model (protobuf)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1024)
    if _TIKTOKEN_LINE_RE.match(head):
        return "tiktoken"
    # A serialized ModelProto starts with field 1 (repeated SentencePiece pieces), length-delimited: tag 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise ValueError(
        f"{path} is neither a tiktoken BPE file nor a SentencePiece model (file starts with {head[:32]!r})"
    )


_SEARCHED = ("tokenizer.model", "original/tokenizer.model")


def load_tokenizer(
    path: str | os.PathLike[str] | None = None, vocab_size: int | None = None
) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer for a checkpoint.

    Args:
        path: a tokenizer file, a checkpoint directory holding `tokenizer.model` or `original/tokenizer.model`
            (the Hugging Face layout of Meta's releases), or None.
        vocab_size: the model's vocabulary size, if known. It decides whether falling back to the default
            Llama 3 tokenizer is safe, and a tokenizer larger than the model is rejected.

    The file type is decided by content, not name: tiktoken files → `Tokenizer`, SentencePiece protobufs →
    `SentencePieceTokenizer`. When `path` is None or a directory without a tokenizer file, the default
    Llama 3 tokenizer is returned if `vocab_size` is None or 128256; otherwise FileNotFoundError. A `path`
    that does not exist at all is always an error (a typo should not silently load another tokenizer).
    """
    file: Path | None = None
    if path is not None:
        p = Path(path)
        if p.is_file():
            file = p
        elif p.is_dir():
            file = next((p / name for name in _SEARCHED if (p / name).is_file()), None)
            trimmed = (p / SUBSET_FILE).is_file()  # trimmed Llama 3 vocabularies need only the default file
            if file is None and not trimmed and vocab_size not in (None, LLAMA3_VOCAB_SIZE):
                raise FileNotFoundError(
                    f"no tokenizer in {p} (looked for {', '.join(_SEARCHED)}) and vocab_size={vocab_size} "
                    f"is not the Llama 3 default {LLAMA3_VOCAB_SIZE}, so the default tokenizer cannot stand in"
                )
        else:
            raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    elif vocab_size not in (None, LLAMA3_VOCAB_SIZE):
        raise FileNotFoundError(
            f"no tokenizer path given and vocab_size={vocab_size} is not the Llama 3 default {LLAMA3_VOCAB_SIZE}"
        )

    tokenizer: Tokenizer | SentencePieceTokenizer
    if file is None:
        tokenizer = Tokenizer()
    elif detect_tokenizer_format(file) == "tiktoken":
        tokenizer = Tokenizer(file)
    else:
        from herd.text.sp_tokenizer import (
            SentencePieceTokenizer,
        )  # sentencepiece is only needed for Llama 1/2

        tokenizer = SentencePieceTokenizer(file)
    subset_file = Path(path) / SUBSET_FILE if path is not None and Path(path).is_dir() else None
    if subset_file is not None and subset_file.is_file():  # a model trained on a trimmed vocabulary
        tokenizer = SubsetTokenizer.load(subset_file, tokenizer)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'path', file)} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size={vocab_size}"
        )
    return tokenizer
