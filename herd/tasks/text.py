"""Causal-LM pretraining on packed text: the text task of the one training loop (`herd train text`).

Config sections: `[model]` (preset or `init_from`, `vocab_subset`) and `[data]` (source, paths,
seq_len, batch size). Runs under every layout: FSDP/HSDP, TP, CP and PP (`herd.plans.llama`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.config import DataConfig, ModelConfig
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.data.synthetic.text import generate_corpus
from herd.data.training.packed_text import PackedBatches, TokenSource, sequential_batches, tokenize_documents
from herd.data.training.text_sources import iter_documents
from herd.data.training.token_shards import ShardedTokenStream, split_validation
from herd.losses import causal_lm_loss
from herd.plans.llama import LLAMA_PLAN
from herd.task import LAYOUT_DIMS, LossOutput, TaskBase
from herd.text.args import ModelArgs, get_preset
from herd.text.loading import save_text_model
from herd.text.model import Llama
from herd.text.vocab_subset import SubsetTokenizer

# the words the Llama 3 chat format adds around messages (roles and the header separator)
CHAT_TEMPLATE_TEXTS = ("system", "user", "assistant", "ipython", "\n\n")


class CausalLMObjective:
    """Next-token prediction on rows of `tokens` / `labels` / `document_ids` (and context parallelism's
    `positions`): the inputs and loss the text and SFT tasks share."""

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = {"document_ids": batch.get("document_ids")}
        if batch.get("positions") is not None:  # context parallelism handed this rank two chunks
            kwargs["positions"] = batch["positions"]
        return (batch["tokens"],), kwargs

    def loss_from_output(self, logits: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        loss_sum, n = causal_lm_loss(logits, batch["labels"])  # logits (B, T, V)
        return LossOutput(loss_sum, n)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        """A trimmed vocabulary cannot be exported for transformers: say so before training, not after."""
        if fmt == "hf":
            from herd.text.hf_tokenizer import refuse_subset_vocabulary

            refuse_subset_vocabulary(self.tokenizer, out_dir)  # type: ignore[attr-defined]


class TextPretrainTask(CausalLMObjective, TaskBase):
    name = "text"
    layouts = frozenset(LAYOUT_DIMS)
    plan = LLAMA_PLAN
    sections = ("model", "data")

    def __init__(self, model: ModelConfig, data: DataConfig, tokenizer: Any | None = None) -> None:
        self.model_cfg, self.data = model, data
        self.skipped = SkipCounter()
        pretokenized = data.source == "tokens"
        if pretokenized and model.vocab_subset:
            raise ValueError(
                "model.vocab_subset needs document text; it cannot be used with data.source = 'tokens'"
            )
        docs = [] if pretokenized else self._documents()
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model.init_from)
        model_overrides = dict(model.args)
        if model.vocab_subset:
            # the chat template's role names and separator too, so the model can be chat-tuned later
            tokenizer = SubsetTokenizer.from_texts(tokenizer, [*docs, *CHAT_TEMPLATE_TEXTS])
            # pad to a multiple of 64: even shards under TP × FSDP, and tensor-core-friendly shapes
            model_overrides["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
        self.tokenizer = tokenizer
        if model.init_from:  # fine-tuning: the checkpoint's architecture, not the preset's
            from herd.text.loading import load_checkpoint

            self.model_args: ModelArgs = load_checkpoint(model.init_from)[0]
        else:
            self.model_args = get_preset(model.preset, **model_overrides)
        if self.model_args.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.model_args.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}"
            )
        if pretokenized:  # memmap shards written by `herd data tokenize`
            if len(data.paths) != 1:
                raise ValueError("data.source = 'tokens' takes one shard directory in data.paths")
            stream = ShardedTokenStream(data.paths[0])
            stream.check_tokenizer(tokenizer)
            self.train_stream, self.val_stream = split_validation(stream, data.val_fraction)
        else:
            self.train_stream, self.val_stream = self._split_and_tokenize(docs)

    def _documents(self) -> list[str]:
        d = self.data
        if d.source == "synthetic":
            return generate_corpus(d.synthetic_docs, seed=d.seed)
        if not d.paths:
            raise ValueError(f"data.source = {d.source!r} needs data.paths")
        docs = list(iter_documents(d.source, d.paths, d.text_field, self.skipped))
        if not docs:
            raise ValueError(f"data.paths {d.paths}: no usable document ({self.skipped.summary()})")
        return docs

    def _split_and_tokenize(self, docs: list[str]) -> tuple[TokenSource, TokenSource | None]:
        n_val = int(len(docs) * self.data.val_fraction)
        train = tokenize_documents(docs[n_val:], self.tokenizer)
        val = tokenize_documents(docs[:n_val], self.tokenizer) if n_val else None
        return train, val

    def skip_counts(self) -> dict[str, SkipCounter]:
        return {"documents": self.skipped}

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return Llama(self.model_args)

    def init_weights(self, model: nn.Module) -> None:
        if not self.model_cfg.init_from:
            model.init_weights()
            return
        from herd.text.loading import load_checkpoint

        args, state = load_checkpoint(self.model_cfg.init_from)
        if args.to_dict() != self.model_args.to_dict():
            raise ValueError(
                f"model.init_from {self.model_cfg.init_from}: its architecture differs from the config's"
            )
        own = model.state_dict().keys()  # a pipeline stage holds only some of the layers
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        d = self.data
        return PackedBatches(self.train_stream, d.seq_len, d.batch_size, rank, world_size, seed=d.seed)

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        if self.val_stream is None:
            return None
        seq_len = self.data.seq_len
        n_windows = (len(self.val_stream) - 1) // seq_len
        if n_windows == 0:
            return None
        return sequential_batches(self.val_stream, seq_len, min(self.data.batch_size, n_windows))

    def flops_per_target(self) -> float | None:
        return self.model_args.training_flops_per_token(self.data.seq_len)

    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """Write a trained state dict where `load_pretrained` reads it, with the tokenizer it was trained with."""
        return save_text_model(state_dict, self.model_args, self.tokenizer, out_dir, fmt)  # type: ignore[arg-type]


__all__ = ["CHAT_TEMPLATE_TEXTS", "CausalLMObjective", "TextPretrainTask"]
