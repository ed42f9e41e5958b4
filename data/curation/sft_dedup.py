"""Semantic dedup of SFT dialogs (Llama 3 §4.2.3): embed whole dialogs, cluster, keep greedily.

The paper clusters complete dialogs with RoBERTa, sorts each cluster by quality score × difficulty score,
and walks it in that order keeping an example only when its cosine similarity to every example already
kept in the cluster is below a threshold. Here the embedding is either

- the mean of a herd checkpoint's final-normed hidden states over the dialog's chat-format tokens
  (`HerdEmbedder`; any `herd` text checkpoint, a reward model's trunk included), or
- the attention-masked mean of a local Hugging Face encoder's last hidden states over a plain-text
  transcript (`HFEmbedder`; e.g. a RoBERTa folder; `local_files_only`, nothing is downloaded),

L2-normalised, clustered with faiss k-means (spherical, seeded), and `greedy_select` does the walk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from herd.data.curation.sft_judge import transcript


class HerdEmbedder:
    """Mean-pooled final-normed hidden states of a herd Llama over each dialog's chat-format tokens.

    Dialogs are right-padded into batches; attention is causal, so the padding after a dialog cannot
    change its positions, and the mean is over the dialog's own positions. A dialog longer than the
    model's context keeps its first max_seq_len tokens (counted in `truncated`)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        from herd.text.chat_format import ChatFormat

        self.model, self.format, self.batch_size = model, ChatFormat(tokenizer), batch_size
        self.pad_id = max(getattr(tokenizer, "pad_id", 0), 0)
        self.truncated = 0
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size (a progress bar)

    @torch.inference_mode()
    def __call__(self, dialogs: Sequence[list[Any]]) -> np.ndarray:
        device = next(self.model.parameters()).device
        max_len = self.model.args.max_seq_len
        encoded = []
        for d in dialogs:
            ids = self.format.encode_dialog_prompt(list(d), add_generation_prompt=False)
            if len(ids) > max_len:
                self.truncated += 1
                ids = ids[:max_len]
            encoded.append(ids)
        out = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            tokens = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=device)  # (B, T)
            mask = torch.zeros(len(chunk), width, 1, device=device)  # (B, T, 1)
            for b, ids in enumerate(chunk):
                tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
                mask[b, : len(ids)] = 1.0
            h = self.model.norm(self.model.forward_hidden(tokens)).float()  # (B, T, D)
            out.append(((h * mask).sum(1) / mask.sum(1)).cpu().numpy())  # (B, D)
            if self.on_batch is not None:
                self.on_batch(len(chunk))
        return np.concatenate(out).astype(np.float32)


class HFEmbedder:
    """Mean-pooled last hidden states of a local Hugging Face encoder (AutoModel) over dialog transcripts."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.on_batch: Callable[[int], None] | None = None

    @torch.inference_mode()
    def __call__(self, dialogs: Sequence[list[Any]]) -> np.ndarray:
        texts = [transcript(d, max_chars=1 << 30) for d in dialogs]
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
            h = self.model(**enc).last_hidden_state.float()  # (B, T, D)
            mask = enc["attention_mask"][..., None].float()  # (B, T, 1)
            out.append(((h * mask).sum(1) / mask.sum(1)).cpu().numpy())
            if self.on_batch is not None:
                self.on_batch(len(enc["input_ids"]))
        return np.concatenate(out).astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans_clusters(x: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Cluster id (n,) of each L2-normalised row of x (n, d): faiss spherical k-means, seeded."""
    import faiss

    n = x.shape[0]
    k = max(1, min(n_clusters, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)  # fmt: skip
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assign[:, 0].astype(np.int64)


def greedy_select(
    x: np.ndarray, clusters: np.ndarray, priority: Sequence[float], threshold: float
) -> tuple[np.ndarray, dict[int, tuple[int, float]]]:
    """Greedy semantic dedup over L2-normalised rows x (n, d).

    Within each cluster, rows are visited by priority (descending; ties by index) and one is kept when its
    cosine similarity to every row kept so far in that cluster is below `threshold`. Returns (kept mask
    (n,), {removed row: (the kept row it is most similar to, that cosine)})."""
    n = x.shape[0]
    keep = np.zeros(n, dtype=bool)
    why: dict[int, tuple[int, float]] = {}
    prio = np.asarray(priority, dtype=np.float64)
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        order = members[np.lexsort((members, -prio[members]))]  # priority desc, then index asc
        kept: list[int] = []
        kept_vecs = np.empty((len(order), x.shape[1]), dtype=np.float32)
        for i in order:
            if kept:
                sims = kept_vecs[: len(kept)] @ x[i]  # (kept,)
                j = int(np.argmax(sims))
                if sims[j] >= threshold:
                    why[int(i)] = (kept[j], float(sims[j]))
                    continue
            kept_vecs[len(kept)] = x[i]
            kept.append(int(i))
            keep[i] = True
    return keep, why
