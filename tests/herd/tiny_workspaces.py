"""Workspaces the task tests share: a tiny random Llama exported with a tokenizer trimmed to the test's
words, beside the generated data it trains on (preference pairs, coloured-shape images)."""

from pathlib import Path

import torch

from herd.data.synthetic.preferences import generate_preferences, preference_texts, write_preference_splits
from herd.data.synthetic.shapes import write_shapes_dataset
from herd.text import build_llama, get_preset
from herd.text.loading import save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

SHAPE_QA_WORDS = (
    "Question: What color is the square? What shape is the red object? How many shapes are there?",
    "Is the red circle left or right of the blue square? Answer: red green blue yellow purple orange",
    "circle square triangle one two three left right",
)


def write_tiny_llm(out_dir: Path, texts: list[str], max_seq_len: int) -> None:
    """A seeded 2-layer, 64-wide Llama whose vocabulary covers `texts` (padded to a multiple of 64)."""
    tok = SubsetTokenizer.from_texts(Tokenizer(), texts)
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=max_seq_len)  # fmt: skip
    save_text_model(build_llama(args).state_dict(), args, tok, out_dir, "meta")


def write_preference_workspace(root: Path, n_train: int, n_val: int) -> Path:
    """`root/prefs` (train/val preference jsonl) and `root/llm`."""
    write_preference_splits(root / "prefs", n_train=n_train, n_val=n_val, seed=0)
    write_tiny_llm(root / "llm", [*preference_texts(generate_preferences(300)), "user assistant\n\n"], 128)
    return root


def write_vision_workspace(root: Path, n_train: int, n_val: int) -> Path:
    """`root/shapes` (56-px coloured-shape QA) and `root/llm`."""
    write_shapes_dataset(root / "shapes", n_train=n_train, n_val=n_val, seed=0, image_size=56)
    write_tiny_llm(root / "llm", list(SHAPE_QA_WORDS), 64)
    return root
