"""BEST-RQ pretraining of the speech encoder (paper §8.1.1): `herd train speech-encoder`.

Each utterance of the manifest becomes one row of a batch:

    audio (16 kHz mono) → 80-dim log-mel, 10 ms hop          (T, 80)
      → random crop to `speech.crop_frames` frames (paper: 6K frames, 60 s) when longer
      → per-utterance mean/variance normalisation           features (T, 80): the quantizer's input
      → spans of 32 frames masked (p = 2.5 % per start frame), masked frames → N(0, 0.1²) noise
                                                            inputs (T, 80): the encoder's input

and the model (`herd.speech.bestrq.BestRQModel`) predicts, at every 40 ms encoder frame that holds a
masked input frame, the code of each of the 16 frozen random-projection codebooks. The loss of a masked
frame is the mean over codebooks of the cross-entropy; the loop's targets are the masked frames.
Extra metric: `code_accuracy`, the fraction of (masked frame, codebook) codes predicted right.

Crop, mask and noise are drawn from the sample's own seed (data seed, epoch, record): a sample gets the
same ones on every layout, so FSDP equals one process, and new ones each epoch. Validation batches
always use epoch 0's, so the validation loss is measured on the same masks every time.

Data contract: records without an audio path, undecodable, empty, too short or too long files are
skipped and counted by reason (`herd.data.training.audio`). Layouts: FSDP and HSDP (`herd.plans.conformer`).
Export: the encoder alone, `herd.speech.encoder_io` (any `checkpoint.export_format` but "none").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.config import DataConfig, SpeechConfig
from herd.data.records import SkipCounter
from herd.data.training.audio import AudioDataset
from herd.plans.conformer import CONFORMER_PLAN
from herd.speech.bestrq import (
    BestRQArgs,
    BestRQModel,
    BestRQModelArgs,
    apply_noise,
    expected_mask_fraction,
    masked_target_frames,
    multi_softmax_loss,
    span_mask,
)
from herd.speech.conformer_args import get_speech_preset
from herd.speech.encoder_io import save_speech_encoder
from herd.speech.features import LogMel, normalize_per_utterance, pad_features
from herd.task import LossOutput, ResumableBatches, TaskBase


class AudioData:
    """The data side shared by the tasks that read `[speech]` audio (a jsonl manifest or tar shards):
    `dataset`, `skip_counts`, `train_batches`. A task sets `record_check` (fields → skip reason or None)
    and has `encode`; `encode_train` is what training batches go through (the SFT task augments there)."""

    speech: SpeechConfig
    data: DataConfig
    _skipped: dict[str, SkipCounter]
    record_check: Callable[[dict[str, Any]], str | None] | None = None

    def dataset(self, split: str, rank: int = 0, world_size: int = 1, loop: bool = True) -> AudioDataset:
        s = self.speech
        kw = {"rank": rank, "world_size": world_size, "seed": self.data.seed, "loop": loop, "shuffle": loop,
              "max_seconds": s.max_seconds, "check": self.record_check}  # fmt: skip
        if split == "train" and s.shards:
            data = AudioDataset.from_tar_shards(s.shards, **kw)
        else:
            data = AudioDataset.from_jsonl(s.val_manifest if split == "val" else s.train_manifest, **kw)
        self._skipped[split] = data.skipped
        return data

    def skip_counts(self) -> dict[str, SkipCounter]:
        return dict(self._skipped)

    def encode_train(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.encode(samples)  # type: ignore[attr-defined]

    def train_batches(self, rank: int, world_size: int) -> ResumableBatches:
        if self.data.batch_size % world_size:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} is not divisible by {world_size} data ranks"
            )
        self.train_data = self.dataset("train", rank, world_size)
        return ResumableBatches(self.train_data, self.data.batch_size // world_size, self.encode_train)


class SpeechEncoderTask(AudioData, TaskBase):
    """BEST-RQ pretraining (`herd train speech-encoder`). Config sections: `[speech]` (encoder, quantizer,
    masking, manifests) and `[data]` (batch size, seed)."""

    name = "speech-encoder"
    layouts = frozenset({"fsdp", "hsdp"})
    plan = CONFORMER_PLAN
    sections = ("speech", "data")

    def __init__(self, speech: SpeechConfig, data: DataConfig) -> None:
        s = speech
        if not (s.train_manifest or s.shards):
            raise ValueError(
                'speech.train_manifest (jsonl of {"audio": path, ...}) or speech.shards is required'
            )
        if s.crop_frames < 1 or s.max_seconds <= 0:
            raise ValueError(
                f"speech.crop_frames must be ≥ 1 and speech.max_seconds > 0, got {s.crop_frames}, {s.max_seconds}"
            )
        self.speech, self.data = speech, data
        self.encoder_args = get_speech_preset(s.encoder, **s.encoder_args)
        self.bestrq_args = BestRQArgs(
            num_codebooks=s.num_codebooks, codebook_size=s.codebook_size, code_dim=s.code_dim,
            mask_prob=s.mask_prob, mask_span=s.mask_span, noise_std=s.noise_std, quantizer_seed=s.quantizer_seed,
        )  # fmt: skip
        self.model_args = BestRQModelArgs(self.encoder_args, self.bestrq_args)
        self.log_mel = LogMel(n_mels=self.encoder_args.n_mels)
        self._skipped: dict[str, SkipCounter] = {}

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return BestRQModel(self.encoder_args, self.bestrq_args)

    def init_weights(self, model: nn.Module) -> None:
        """PyTorch's default initialisation of every layer (seeded by the loop), the quantizer from its seed."""
        model.init_weights()  # type: ignore[operator]

    # --- data -----------------------------------------------------------------------------------------
    def features(self, audio: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N,) waveform → (T, n_mels) normalised log-mel of a random crop of at most `crop_frames`."""
        mel, frames = self.log_mel(audio.reshape(1, -1))  # (1, T, n_mels)
        T, crop = int(frames[0]), self.speech.crop_frames
        start = int(torch.randint(0, T - crop + 1, (1,), generator=generator)) if crop < T else 0
        mel = mel[:, start : start + crop]
        return normalize_per_utterance(mel, torch.tensor([mel.shape[1]]))[0]

    def encode(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch: clean `features` and masked `inputs` (B, T, n_mels), `lengths` (B,), frame `mask`
        (B, T) (True = masked), `target_mask` (B, T') (encoder frames that carry a loss)."""
        a = self.bestrq_args
        clean, noisy, masks = [], [], []
        for sample in samples:
            g = torch.Generator().manual_seed(int(sample["seed"]))
            feats = self.features(sample["audio"], g)  # (T, n_mels)
            mask = span_mask(feats.shape[0], feats.shape[0], a.mask_prob, a.mask_span, g)  # (T,)
            clean.append(feats)
            noisy.append(apply_noise(feats, mask, a.noise_std, g))
            masks.append(mask[:, None].float())
        features, lengths, _ = pad_features(clean)
        inputs, _, _ = pad_features(noisy)
        mask = pad_features(masks)[0][..., 0] > 0.5  # (B, T)
        target_mask = masked_target_frames(mask, lengths, self.encoder_args.stack)  # (B, T')
        return {"features": features, "inputs": inputs, "lengths": lengths, "mask": mask,
                "target_mask": target_mask}  # fmt: skip

    def val_batches(self):
        if not self.speech.val_manifest:
            return None
        return self._val_batches(self.dataset("val", loop=False), self.data.batch_size)

    def _val_batches(self, data: AudioDataset, b: int):
        batch: list[dict[str, Any]] = []
        for sample in data:
            batch.append(sample)
            if len(batch) == b:
                yield self.encode(batch)
                batch = []
        if batch:  # the last, ragged batch counts too
            yield self.encode(batch)

    # --- the step -------------------------------------------------------------------------------------
    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["target_mask"].sum())

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch["inputs"], batch["lengths"], batch["features"], batch["target_mask"]), {}

    def loss_from_output(
        self, output: tuple[torch.Tensor, torch.Tensor], batch: dict[str, Any]
    ) -> LossOutput:
        logits, targets = output  # (N, C, V), (N, C)
        loss_sum, n = multi_softmax_loss(logits, targets)
        with torch.no_grad():  # per masked frame: the fraction of its codebooks predicted right
            correct = float((logits.argmax(-1) == targets).float().mean(-1).sum()) if n else 0.0
        return LossOutput(loss_sum, n, {"code_accuracy": correct})

    def flops_per_target(self) -> float:
        """Training FLOPs per masked encoder frame, for utterances of `crop_frames` frames: the encoder runs
        on every frame, about 1 / (expected masked fraction) frames per target, and the heads on masked
        frames only. An estimate: shorter utterances mask a little less (see `expected_mask_fraction`)."""
        a, b = self.encoder_args, self.bestrq_args
        frames = -(-self.speech.crop_frames // a.stack)
        masked = expected_mask_fraction(self.speech.crop_frames, b.mask_prob, b.mask_span)
        heads = 6.0 * a.dim * b.num_codebooks * b.codebook_size
        return a.flops_per_frame(frames) / masked + heads

    # --- export ---------------------------------------------------------------------------------------
    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """The encoder in herd's speech-encoder layout (`herd.speech.encoder_io`), which the speech adapter
        loads; any `checkpoint.export_format` but "none" writes it (there is no Meta or Hugging Face
        layout of this encoder to follow)."""
        if fmt == "none":
            return None
        return save_speech_encoder(
            state_dict, self.encoder_args, out_dir, prefix="encoder.",
            pretraining={"objective": "bestrq", **self.bestrq_args.to_dict()},
        )  # fmt: skip


__all__ = ["AudioData", "SpeechEncoderTask"]
