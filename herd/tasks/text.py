"""Causal-LM pretraining on packed text: the text task of the one training loop."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from herd.config import JobConfig
from herd.data.packed_text import (
    IGNORE_INDEX,
    PackedBatches,
    SkippedRecords,
    TokenSource,
    sequential_batches,
    tokenize_documents,
)
from herd.data.synthetic_text import generate_corpus
from herd.data.text_sources import iter_documents
from herd.data.token_shards import ShardedTokenStream, split_validation
from herd.text.args import ModelArgs, get_preset
from herd.text.model import Llama
from herd.text.vocab_subset import SubsetTokenizer
from herd.trainer import LossOutput

# the words the Llama 3 chat format adds around messages (roles and the header separator)
CHAT_TEMPLATE_TEXTS = ("system", "user", "assistant", "ipython", "\n\n")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy in fp32 over targets != -100; logits (B, T, V), labels (B, T)."""
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((labels != IGNORE_INDEX).sum())


def training_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """6·N (dense matmuls, forward + backward) + 12·L·D·T (causal attention scores and values), as in
    the PaLM/torchtitan accounting; embeddings are a lookup, not a matmul, and are excluded."""
    n_matmul = args.num_params(include_embedding=False)
    if args.tie_embeddings:  # the head reuses the embedding matrix: it is a matmul all the same
        n_matmul += args.vocab_size * args.dim
    return 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len


class TextPretrainTask:
    def __init__(self, cfg: JobConfig, tokenizer: Any | None = None) -> None:
        self.cfg = cfg
        self.skipped = SkippedRecords()
        pretokenized = cfg.data.source == "tokens"
        if pretokenized and cfg.model.vocab_subset:
            raise ValueError(
                "model.vocab_subset needs document text; it cannot be used with data.source = 'tokens'"
            )
        docs = [] if pretokenized else self._documents()
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.init_from)
        model_overrides = dict(cfg.model.args)
        if cfg.model.vocab_subset:
            # the chat template's role names and separator too, so the model can be chat-tuned later
            tokenizer = SubsetTokenizer.from_texts(tokenizer, [*docs, *CHAT_TEMPLATE_TEXTS])
            # pad to a multiple of 64: even shards under TP × FSDP, and tensor-core-friendly shapes
            model_overrides["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
        self.tokenizer = tokenizer
        if cfg.model.init_from:  # fine-tuning: the checkpoint's architecture, not the preset's
            from herd.text.loading import load_checkpoint

            self.model_args = load_checkpoint(cfg.model.init_from)[0]
        else:
            self.model_args = get_preset(cfg.model.preset, **model_overrides)
        if self.model_args.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.model_args.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}"
            )
        if pretokenized:  # memmap shards written by `herd data tokenize`
            if len(cfg.data.paths) != 1:
                raise ValueError("data.source = 'tokens' takes one shard directory in data.paths")
            stream = ShardedTokenStream(cfg.data.paths[0])
            stream.check_tokenizer(tokenizer)
            self.train_stream, self.val_stream = split_validation(stream, cfg.data.val_fraction)
        else:
            self.train_stream, self.val_stream = self._split_and_tokenize(docs)

    def _documents(self) -> list[str]:
        d = self.cfg.data
        if d.source == "synthetic":
            return generate_corpus(d.synthetic_docs, seed=d.seed)
        if not d.paths:
            raise ValueError(f"data.source = {d.source!r} needs data.paths")
        if d.source not in ("jsonl", "parquet", "text"):
            raise ValueError(
                f"data.source must be synthetic, jsonl, parquet, text or tokens, got {d.source!r}"
            )
        docs = list(iter_documents(d.source, d.paths, d.text_field, self.skipped))
        if self.skipped.count:
            Console(stderr=True).print(
                f"[yellow]skipped {self.skipped.count} bad record(s), e.g. {self.skipped.examples[0]}"
            )
        return docs

    def _split_and_tokenize(self, docs: list[str]) -> tuple[TokenSource, TokenSource | None]:
        n_val = int(len(docs) * self.cfg.data.val_fraction)
        train = tokenize_documents(docs[n_val:], self.tokenizer)
        val = tokenize_documents(docs[:n_val], self.tokenizer) if n_val else None
        return train, val

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return Llama(self.model_args)

    def init_weights(self, model: nn.Module) -> None:
        if not self.cfg.model.init_from:
            model.init_weights()
            return
        from herd.text.loading import load_checkpoint

        args, state = load_checkpoint(self.cfg.model.init_from)
        if args.to_dict() != self.model_args.to_dict():
            raise ValueError(
                f"model.init_from {self.cfg.model.init_from}: its architecture differs from the config's"
            )
        own = model.state_dict().keys()  # a pipeline stage holds only some of the layers
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        return PackedBatches(self.train_stream, d.seq_len, d.batch_size, rank, world_size, seed=d.seed)

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        if self.val_stream is None:
            return None
        seq_len = self.cfg.data.seq_len
        n_windows = (len(self.val_stream) - 1) // seq_len
        if n_windows == 0:
            return None
        return sequential_batches(self.val_stream, seq_len, min(self.cfg.data.batch_size, n_windows))

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        # `positions` is present when context parallelism handed this rank two chunks of the sequence
        logits = model(batch["tokens"], document_ids=batch["document_ids"], positions=batch.get("positions"))
        loss_sum, n = causal_lm_loss(logits, batch["labels"])
        return LossOutput(loss_sum, n)

    def flops_per_target(self) -> float | None:
        return training_flops_per_token(self.model_args, self.cfg.data.seq_len)

    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """Write a trained state dict where `load_pretrained` reads it, with the tokenizer it was trained with."""
        return export_text_model(state_dict, self.model_args, self.tokenizer, out_dir, fmt)


def export_text_model(
    state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Any, out_dir: str | Path, fmt: str
) -> Path | None:
    if fmt == "none":
        return None
    out = Path(out_dir)
    if fmt == "meta":
        from herd.text.checkpoint_meta import save_meta_checkpoint

        save_meta_checkpoint(out, args, state, overwrite=True)
    elif fmt == "hf":
        from herd.text.checkpoint_hf import save_hf_checkpoint

        save_hf_checkpoint(out, args, state, overwrite=True)
    else:
        raise ValueError(f"checkpoint.export_format must be meta, hf or none, got {fmt!r}")
    if isinstance(tokenizer, SubsetTokenizer):
        tokenizer.save(out)
        tokenizer = tokenizer.base
    tok_file = getattr(tokenizer, "path", None)
    if tok_file is not None and Path(tok_file).is_file():
        shutil.copy2(tok_file, out / "tokenizer.model")
    return out
