"""The speech task tests' workspace: eSpeak NG utterances over the speech quickstart's words and a tiny
random Llama whose trimmed vocabulary covers them and the paper's task prompts."""

from pathlib import Path

from tiny_workspaces import write_tiny_llm

from herd.data.synthetic.speech import write_speech_dataset
from herd.quickstart_speech import QUICKSTART_WORDS, domain_phrases

PROMPT_WORDS = (
    "Repeat after me in English: Translate the following sentence into English: Question: Answer:",
    " ".join(QUICKSTART_WORDS),
)


def write_speech_workspace(root: Path, n_train: int, n_test: int) -> Path:
    """`root/speech` (train/test jsonl + 16 kHz wavs; the test split by held-out voices) and `root/llm`."""
    write_speech_dataset(
        root / "speech", n_train, n_test, seed=0, words=QUICKSTART_WORDS, sentences=domain_phrases
    )
    write_tiny_llm(root / "llm", list(PROMPT_WORDS), 256)
    return root
