"""BEST-RQ pretraining of the speech encoder (Chiu et al. 2022; Llama 3 §8.1.1).

Targets come from a *frozen random-projection quantizer*: 4 stacked log-mel frames (320 dims, the
encoder's 40 ms frame) are projected to 16 dims and matched to the nearest of 8,192 unit-norm codes by
cosine similarity, in each of 16 codebooks. Each codebook is an independent quantizer with its own
projection (Xavier-uniform, as BEST-RQ initialises it) and its own codes (standard normal, then
L2-normalised): 16 codebooks give 16 different labelings of the same frame. Neither is ever trained; both
are drawn from `quantizer_seed` alone, so every rank and every run gets the same targets.

Input masking (paper: "mask 32-frame length with a probability of 2.5%"): every real 10 ms frame starts
a span of `mask_span` frames with probability `mask_prob`; spans may overlap and are cut at the end of
the utterance; masked frames are replaced by noise N(0, noise_std²) (BEST-RQ's 0.1 on normalised
features). A frame t is masked unless none of the ≤ 32 frames that could start a span covering it did:

    P(frame t masked) = 1 − (1 − p)^min(t + 1, span)        (1 − 0.975³² = 0.555 away from the start)

so the expected masked fraction of an L-frame utterance is (1/L) Σ_t [1 − (1 − p)^min(t+1, span)].

Loss ("multi-softmax"): the encoder's output at each *masked* 40 ms frame — one whose 4 input frames
include a masked one — goes through one linear softmax head per codebook; the loss of a frame is the
mean over codebooks of the cross-entropy against that codebook's code. Unmasked frames carry no loss.

Shape legend: B utterances, T 10 ms frames, T' = ⌈T/4⌉ encoder frames, C codebooks, V codes per book,
K code dim, N masked encoder frames in the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.speech.conformer import ConformerEncoder, frame_mask, stack_frames
from herd.speech.conformer_args import ConformerArgs


@dataclass
class BestRQArgs:
    num_codebooks: int = 16
    codebook_size: int = 8192
    code_dim: int = 16
    mask_prob: float = 0.025  # probability that a frame starts a masked span
    mask_span: int = 32  # frames (10 ms) per span
    noise_std: float = 0.1  # masked frames are replaced by N(0, noise_std²)
    quantizer_seed: int = 0  # the projection and codebooks depend on this alone

    def __post_init__(self) -> None:
        if min(self.num_codebooks, self.codebook_size, self.code_dim, self.mask_span) < 1:
            raise ValueError("num_codebooks, codebook_size, code_dim and mask_span must be ≥ 1")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expected_mask_fraction(length: int, prob: float, span: int) -> float:
    """Expected fraction of masked frames of an utterance of `length` frames (see the module docstring)."""
    if length <= 0:
        return 0.0
    return sum(1.0 - (1.0 - prob) ** min(t + 1, span) for t in range(length)) / length


def span_mask(length: int, max_len: int, prob: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """(max_len,) bool, True on masked frames: each of the first `length` frames starts a span with
    probability `prob`; spans cover `span` frames, overlap freely and stop at `length`."""
    starts = torch.rand(length, generator=generator) < prob  # (length,)
    # frame t is masked iff a span started at one of t−span+1 .. t: a running count over a window
    counts = F.conv1d(F.pad(starts.float()[None, None], (span - 1, 0)), torch.ones(1, 1, span))[0, 0]
    mask = torch.zeros(max_len, dtype=torch.bool)
    mask[:length] = counts > 0.5
    return mask


def apply_noise(
    features: torch.Tensor, mask: torch.Tensor, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """(T, C) features with the masked frames (mask (T,) bool) replaced by N(0, noise_std²) noise."""
    out = features.clone()
    n = int(mask.sum())
    if n:
        out[mask] = torch.randn(n, features.shape[1], generator=generator, dtype=features.dtype) * noise_std
    return out


def masked_target_frames(mask: torch.Tensor, lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """(B, T) 10 ms frame mask → (B, ⌈T/stack⌉) bool: encoder frames holding a masked input frame."""
    m = stack_frames(mask[..., None].float(), lengths, stack)  # (B, T', stack)
    return m.amax(-1) > 0.5


class RandomProjectionQuantizer(nn.Module):
    """Frozen BEST-RQ quantizer: (…, 320) stacked frames → (…, C) code indices (cosine nearest code).

    `projection` (C, 320, K) and `codebooks` (C, V, K) are persistent buffers (saved in checkpoints, never
    in the optimizer); `reset_parameters` draws them from `seed` alone."""

    def __init__(self, input_dim: int, args: BestRQArgs) -> None:
        super().__init__()
        self.input_dim, self.seed = input_dim, args.quantizer_seed
        C, V, K = args.num_codebooks, args.codebook_size, args.code_dim
        self.register_buffer("projection", torch.empty(C, input_dim, K))
        self.register_buffer("codebooks", torch.empty(C, V, K))
        if not self.projection.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        C, D, K = self.projection.shape
        bound = math.sqrt(6.0 / (D + K))  # Xavier uniform of a D → K projection
        projection = (torch.rand(C, D, K, generator=g) * 2 - 1) * bound
        codes = F.normalize(torch.randn(self.codebooks.shape, generator=g), dim=-1)  # unit norm
        self.projection.copy_(projection)
        self.codebooks.copy_(codes)

    @torch.no_grad()
    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """stacked (…, 320) → codes (…, C) long: argmax over V of cos(projection_c x, code_{c,v})."""
        x = stacked.float().reshape(-1, self.input_dim)  # (M, 320)
        C, V, _ = self.codebooks.shape
        # the (C, rows, V) score block is the memory peak: 2^27 floats (512 MiB) at most at a time
        rows = max(1, (1 << 27) // (C * V))
        out = []
        for chunk in x.split(rows):
            z = F.normalize(torch.einsum("md,cdk->cmk", chunk, self.projection.float()), dim=-1)  # (C, m, K)
            # codes are unit-norm, so the cosine is a dot product with the normalised projection
            scores = torch.einsum("cmk,cvk->cmv", z, self.codebooks.float())  # (C, m, V)
            out.append(scores.argmax(-1).T)  # (m, C)
        codes = torch.cat(out) if out else x.new_zeros(0, C, dtype=torch.long)
        return codes.reshape(*stacked.shape[:-1], C)  # (…, C)


class BestRQModel(nn.Module):
    """Encoder + frozen quantizer + one softmax head per codebook.

    forward(inputs, lengths, features, target_mask) → (logits (N, C, V), targets (N, C)) at the N masked
    encoder frames: the encoder reads `inputs` (masked frames already noise), the quantizer the clean
    `features`."""

    def __init__(self, encoder_args: ConformerArgs, args: BestRQArgs) -> None:
        super().__init__()
        self.encoder_args, self.args = encoder_args, args
        self.encoder = ConformerEncoder(encoder_args)
        self.quantizer = RandomProjectionQuantizer(encoder_args.stacked_dim, args)
        # C heads in one matrix: rows c·V .. (c+1)·V − 1 are codebook c's softmax head
        self.heads = nn.Linear(encoder_args.dim, args.num_codebooks * args.codebook_size)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        # small heads: every codebook starts at the uniform prediction, loss ln V (PyTorch's default
        # ±1/√D weights start 0.2–0.3 nats above it on unit-variance encoder outputs)
        nn.init.normal_(self.heads.weight, std=0.02)
        nn.init.zeros_(self.heads.bias)
        self.quantizer.reset_parameters()

    def forward(
        self,
        inputs: torch.Tensor,  # (B, T, n_mels) normalised log-mel, masked frames replaced by noise
        lengths: torch.Tensor,  # (B,) real frames
        features: torch.Tensor,  # (B, T, n_mels) the same features, clean
        target_mask: torch.Tensor,  # (B, T') bool: encoder frames that carry a loss
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stack = self.encoder_args.stack
        with torch.no_grad():
            targets = self.quantizer(stack_frames(features, lengths, stack))  # (B, T', C)
        h = self.encoder(inputs, lengths)  # (B, T', D)
        valid = target_mask & frame_mask(self.encoder.output_lengths(lengths), h.shape[1])
        C, V = self.args.num_codebooks, self.args.codebook_size
        logits = self.heads(h[valid]).view(-1, C, V)  # (N, C, V)
        return logits, targets[valid]  # (N, C, V), (N, C)


def multi_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over masked frames of the mean-over-codebooks cross-entropy, number of masked frames).
    logits (N, C, V), targets (N, C)."""
    N, C, V = logits.shape
    if N == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (and FSDP's backward hooks) connected
    ce = F.cross_entropy(logits.reshape(N * C, V).float(), targets.reshape(N * C), reduction="sum")
    return ce / C, N


def bestrq_num_params(encoder_args: ConformerArgs, args: BestRQArgs) -> int:
    """Trainable parameters of `BestRQModel`: the encoder and the heads (the quantizer is buffers)."""
    heads = (
        encoder_args.dim * args.num_codebooks * args.codebook_size + args.num_codebooks * args.codebook_size
    )
    return encoder_args.num_params() + heads


@dataclass
class BestRQModelArgs:
    """The pretraining model's architecture (what the training loop logs and checkpoints)."""

    encoder: ConformerArgs
    bestrq: BestRQArgs

    def num_params(self, include_embedding: bool = True) -> int:
        heads = bestrq_num_params(self.encoder, self.bestrq) - self.encoder.num_params()
        return self.encoder.num_params(include_embedding) + heads

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.to_dict(), "bestrq": self.bestrq.to_dict()}


__all__ = [
    "BestRQArgs",
    "BestRQModel",
    "BestRQModelArgs",
    "RandomProjectionQuantizer",
    "apply_noise",
    "bestrq_num_params",
    "expected_mask_fraction",
    "masked_target_frames",
    "multi_softmax_loss",
    "span_mask",
]
