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


VIDEO_QA_WORDS = (
    "Is the red square going left or right? above or below? Which is there first, the red circle or the",
    "blue square? What shape is the green object? a red triangle",
)


def write_video_workspace(root: Path, n_train: int, n_val: int) -> Path:
    """`root/videos` (mp4 clips of moving shapes with questions), `root/llm` and `root/image_model`: a
    seeded, untrained image adapter (tiny encoder, cross-attention before every layer) to start from."""
    from herd.adapters.multimodal import MultimodalLlama
    from herd.adapters.multimodal_io import save_multimodal_model
    from herd.data.synthetic.video_qa import write_video_qa_dataset
    from herd.text.loading import load_model
    from herd.vision.encoder import VisionEncoder
    from herd.vision.vision_args import get_vision_preset

    write_video_qa_dataset(root / "videos", n_train=n_train, n_val=n_val, seed=0)
    write_tiny_llm(root / "llm", [*SHAPE_QA_WORDS, *VIDEO_QA_WORDS], 64)
    torch.manual_seed(1)
    llm = load_model(root / "llm")
    encoder = VisionEncoder(get_vision_preset("tiny", max_num_tiles=1, patch_size=7))
    model = MultimodalLlama(llm, encoder, cross_attention_layers=[0, 1, 2])
    for block in model.cross_attention.values():  # open gates: the image path is live, as after training
        torch.nn.init.constant_(block.gate_attn, 0.5)
        torch.nn.init.constant_(block.gate_ffwd, 0.5)
    save_multimodal_model(model, root / "llm", 1, root / "image_model")
    return root
