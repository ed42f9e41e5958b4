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
    TokenStream,
    read_jsonl_texts,
    read_text_files,
    sequential_batches,
    tokenize_documents,
)
from herd.data.synthetic_text import generate_corpus
from herd.text.args import ModelArgs, get_preset
from herd.text.model import build_llama
from herd.text.vocab_subset import SubsetTokenizer
from herd.trainer import LossOutput


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
        docs = self._documents()
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.init_from)
        model_overrides = dict(cfg.model.args)
        if cfg.model.vocab_subset:
            tokenizer = SubsetTokenizer.from_texts(tokenizer, docs)
            model_overrides["vocab_size"] = tokenizer.vocab_size
        self.tokenizer = tokenizer
        self.model_args = get_preset(cfg.model.preset, **model_overrides)
        if self.model_args.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.model_args.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}"
            )
        self.train_stream, self.val_stream = self._split_and_tokenize(docs)

    def _documents(self) -> list[str]:
        d = self.cfg.data
        if d.source == "synthetic":
            return generate_corpus(d.synthetic_docs, seed=d.seed)
        if not d.paths:
            raise ValueError(f"data.source = {d.source!r} needs data.paths")
        if d.source == "jsonl":
            docs = list(read_jsonl_texts(d.paths, d.text_field, self.skipped))
        elif d.source == "text":
            docs = list(read_text_files(d.paths))
        else:
            raise ValueError(f"data.source must be synthetic, jsonl or text, got {d.source!r}")
        if self.skipped.count:
            Console(stderr=True).print(
                f"[yellow]skipped {self.skipped.count} bad record(s), e.g. {self.skipped.examples[0]}"
            )
        return docs

    def _split_and_tokenize(self, docs: list[str]) -> tuple[TokenStream, TokenStream | None]:
        n_val = int(len(docs) * self.cfg.data.val_fraction)
        train = tokenize_documents(docs[n_val:], self.tokenizer)
        val = tokenize_documents(docs[:n_val], self.tokenizer) if n_val else None
        return train, val

    def build_model(self, device: torch.device) -> nn.Module:
        if self.cfg.model.init_from:
            from herd.text.loading import load_model

            return load_model(self.cfg.model.init_from, device=device)
        return build_llama(self.model_args, device=device)

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
        logits = model(batch["tokens"], document_ids=batch["document_ids"])  # (B, T, V)
        loss_sum, n = causal_lm_loss(logits, batch["labels"])
        return LossOutput(loss_sum, n)

    def flops_per_target(self) -> float | None:
        return training_flops_per_token(self.model_args, self.cfg.data.seq_len)

    def export(self, model: nn.Module, out_dir: str | Path, fmt: str = "meta") -> Path | None:
        """Write the trained model where `load_pretrained` reads it (with the tokenizer it was trained with)."""
        return export_text_model(model, self.model_args, self.tokenizer, out_dir, fmt)


def export_text_model(
    model: nn.Module, args: ModelArgs, tokenizer: Any, out_dir: str | Path, fmt: str
) -> Path | None:
    if fmt == "none":
        return None
    out = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
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
