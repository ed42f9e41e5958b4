"""Supervised fine-tuning (`herd train sft`): the loss on assistant tokens of chat dialogs (Llama 3 §4.1.3).

Llama 3 fine-tunes the pretrained checkpoint on rejection-sampled and curated chat data with the standard
cross-entropy on target tokens, prompt tokens masked out (§4.1.3); Llama 2 §3.1 packs several dialogs into
a sequence. Everything but the data is the text task's: the model and weights come from
`model.init_from` (`TextPretrainTask.init_weights`), the loss is `causal_lm_loss` over the rows that
`herd.data.training.dialogs` builds (the same tokens / labels / document_ids batch keys, so every parallel layout,
context parallelism included, runs unchanged), and the export writes a checkpoint `herd chat` loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from rich.console import Console

from herd.config import DataConfig, ModelConfig, SFTConfig
from herd.data.records import SkipCounter
from herd.data.training.dialogs import (
    DialogBatches,
    EncodedDialog,
    pack_rows,
    read_dialogs,
    sequential_dialog_batches,
    targets_per_row,
)
from herd.tasks.text import TextPretrainTask
from herd.text.chat_format import ChatFormat


class SFTTask(TextPretrainTask):
    """The text task on chat dialogs: `build_model`, `init_weights` (from `model.init_from`), `loss`,
    `num_targets` and `export` are inherited; data and FLOPs accounting are the dialogs'.

    Config: model.init_from (required), sft.train_data, sft.val_data or sft.val_fraction, sft.pack,
    data.seq_len, data.batch_size, data.seed.
    """

    name = "sft"
    sections = ("model", "data", "sft")

    def __init__(
        self, model: ModelConfig, data: DataConfig, sft: SFTConfig, tokenizer: Any | None = None
    ) -> None:
        init_from = model.init_from
        if not init_from:
            raise ValueError(
                "herd train sft fine-tunes a pretrained model: set --model.init_from=CHECKPOINT_DIR "
                "(a `herd train text` export, or a Meta / Hugging Face checkpoint)"
            )
        if not sft.train_data:
            raise ValueError('herd train sft needs sft.train_data: a jsonl of {"messages": [...]} dialogs')
        if model.vocab_subset:
            raise ValueError(
                "model.vocab_subset does not apply to sft: the vocabulary is the checkpoint's "
                f"({init_from}; a trimmed one is read from its vocab_subset.json)"
            )
        from herd.text.loading import load_checkpoint
        from herd.text.tokenizer import load_tokenizer

        self.model_cfg, self.data, self.sft = model, data, sft
        self.skipped = SkipCounter()
        self.model_args = load_checkpoint(init_from)[0]  # fine-tuning: the checkpoint's architecture
        if tokenizer is None:
            tokenizer = load_tokenizer(init_from, vocab_size=self.model_args.vocab_size)
        if self.model_args.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.model_args.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        pad = getattr(tokenizer, "pad_id", -1)
        self.pad_id = pad if pad >= 0 else tokenizer.eos_id  # padding is never a target nor attended to
        self.train_dialogs, self.val_dialogs = self._load_dialogs()
        self._warn_about_data()

    def _load_dialogs(self) -> tuple[list[EncodedDialog], list[EncodedDialog]]:
        sft, seq_len = self.sft, self.data.seq_len
        train = read_dialogs(sft.train_data, self.format, seq_len, self.skipped)
        if not train:
            raise ValueError(f"{sft.train_data}: no usable dialog ({self._skipped_summary()})")
        if sft.val_data:
            return train, read_dialogs(sft.val_data, self.format, seq_len, self.skipped)
        n_val = int(len(train) * sft.val_fraction)
        if n_val == 0:
            return train, []
        # a seeded random hold-out: dialog files are often grouped by source or topic
        held_out = set(np.random.default_rng(self.data.seed).permutation(len(train))[:n_val].tolist())
        return (
            [d for i, d in enumerate(train) if i not in held_out],
            [d for i, d in enumerate(train) if i in held_out],
        )

    def _skipped_summary(self) -> str:
        return self.skipped.summary()

    def skip_counts(self) -> dict[str, SkipCounter]:
        return {"dialogs": self.skipped}

    def _warn_about_data(self) -> None:
        console = Console(stderr=True)
        unknown = getattr(
            self.tokenizer, "unknown_count", 0
        )  # a trimmed vocabulary maps unseen tokens to unk
        if unknown:
            console.print(
                f"[yellow]sft: {unknown} token(s) of the dialogs are outside the checkpoint's trimmed "
                "vocabulary and were read as <unk>"
            )

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        d = self.data
        return DialogBatches(
            self.train_dialogs, d.seq_len, d.batch_size, rank, world_size, d.seed, self.sft.pack, self.pad_id
        )

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        if not self.val_dialogs:
            return None
        d = self.data
        return sequential_dialog_batches(
            self.val_dialogs, d.seq_len, d.batch_size, self.sft.pack, self.pad_id
        )

    def flops_per_target(self) -> float | None:
        """The text task's FLOPs per token × row tokens per trained target (prompts and padding are
        computed but are not targets), measured on the training dialogs packed in file order."""
        seq_len = self.data.seq_len
        lengths = [len(d) for d in self.train_dialogs]
        rows = pack_rows(lengths, range(len(lengths)), seq_len, self.sft.pack)
        per_row = targets_per_row(self.train_dialogs, rows)
        return self.model_args.training_flops_per_token(seq_len) * seq_len / per_row if per_row else None
