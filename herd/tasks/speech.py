"""Speech adapter training on a frozen LLM (paper §8.1.2, §8.3): `herd train speech`.

The LLM comes from a checkpoint and never changes; the Conformer encoder (from a `herd train
speech-encoder` export, `speech.init_encoder`, or random) and the speech adapter train together
(`speech.trainable = "all"`, the paper's recipe), or the adapter alone ("adapter"). Each record becomes

    <|begin_of_text|> + task prompt + <|audio|> × n + target + <|eot_id|>      loss on the target only

with n the clip's adapter frames (`SpeechLlama.audio_tokens`), and the task read off the record:

    "response" (or "answer")  spoken dialogue: the spoken question is answered; `prompt` (optional) is the
                              text before the audio, `prompt_after` the text after it
    "translation"             "Translate the following sentence into {speech.target_language}:"
    "text" (the transcript)   ASR, "Repeat after me in {speech.language}:"

(the paper's prompts, §8.3.1). Audio: 16 kHz mono → 80-dim log-mel (10 ms) → per-utterance normalisation,
as in pretraining. With `speech.spec_augment`, training features get two frequency masks of up to 10
channels and time masks of up to 5 % of the frames (SpecAugment's LibriSpeech "basic" policy, scaled),
drawn from the sample's seed.

Data contract: records with no audio path or no transcript/translation/response are skipped and counted
when the manifest is indexed, and unreadable, empty, too short or too long audio when it is read
(`herd.data.training.audio`); the loop logs the counts. Training data: a jsonl manifest
(`speech.train_manifest`) or webdataset tar shards (`speech.shards`: `key.wav|flac|mp3|ogg` + `key.json`). Layouts: FSDP/HSDP and TP (`herd.plans.speech`).
Export: `herd.adapters.speech_io` (encoder + adapter; the LLM by path), which `herd ask --audio` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.adapters.speech import get_speech_adapter_preset
from herd.adapters.speech_io import save_speech_state
from herd.adapters.speech_llama import SpeechLlama
from herd.config import DataConfig, SpeechConfig
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.losses import causal_lm_loss
from herd.plans.speech import SPEECH_PLAN
from herd.speech.conformer import ConformerEncoder
from herd.speech.conformer_args import ConformerArgs, get_speech_preset
from herd.speech.encoder_io import load_speech_encoder, read_speech_encoder_config
from herd.speech.features import LogMel, normalize_per_utterance, pad_features
from herd.task import LossOutput, TaskBase
from herd.tasks.speech_encoder import AudioData
from herd.tasks.vision import batches_of
from herd.text.loading import load_checkpoint
from herd.text.model import Llama


def _text(fields: dict[str, Any], key: str) -> bool:
    value = fields.get(key)
    return isinstance(value, str) and bool(value.strip())


def speech_objective(fields: dict[str, Any]) -> str | None:
    """ "dialogue", "translation" or "asr" from a record's fields (module docstring); None: unusable."""
    if _text(fields, "response") or _text(fields, "answer"):
        return "dialogue"
    if _text(fields, "translation"):
        return "translation"
    if _text(fields, "text"):
        return "asr"
    return None


def check_speech_record(fields: dict[str, Any]) -> str | None:
    return None if speech_objective(fields) else "missing_text"


def spec_augment(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two frequency masks of ≤ 10 channels and ⌈T/40⌉-capped time masks (≤ 5 % of T each, two) set to 0,
    the normalised features' mean. (T, n_mels) → (T, n_mels)."""
    out = features.clone()
    T, n_mels = out.shape
    for _ in range(2):
        width = int(torch.randint(0, 11, (1,), generator=generator))
        start = int(torch.randint(0, max(1, n_mels - width), (1,), generator=generator))
        out[:, start : start + width] = 0.0
    max_t = max(1, T // 20)
    for _ in range(2):
        width = int(torch.randint(0, max_t + 1, (1,), generator=generator))
        start = int(torch.randint(0, max(1, T - width), (1,), generator=generator))
        out[start : start + width] = 0.0
    return out


class SpeechTask(AudioData, TaskBase):
    """Speech adapter + encoder training on a frozen LLM (`herd train speech`). Config sections:
    `[speech]` (the frozen LLM, encoder, adapter, prompts, manifests) and `[data]` (batch size, seed)."""

    name = "speech"
    layouts = frozenset({"fsdp", "hsdp", "tp"})
    plan = SPEECH_PLAN
    sections = ("speech", "data")
    record_check = staticmethod(check_speech_record)

    def __init__(self, speech: SpeechConfig, data: DataConfig, tokenizer: Any | None = None) -> None:
        s = speech
        if not s.llm:
            raise ValueError("speech.llm: the frozen LLM checkpoint to build on is required")
        if not (s.train_manifest or s.shards):
            raise ValueError(
                'speech.train_manifest (jsonl of {"audio": path, "text": ...}) or speech.shards is required'
            )
        self.speech, self.data = speech, data
        self.llm_args, self._llm_state = load_checkpoint(s.llm)
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(s.llm, vocab_size=self.llm_args.vocab_size)
        self.tokenizer = tokenizer
        self.model_args = self.llm_args  # the runtime's init-mode choice and checkpoint metadata
        self.encoder_args = self._encoder_args()
        self.adapter_args = get_speech_adapter_preset(
            s.adapter,
            **{**s.adapter_args, "encoder_dim": self.encoder_args.dim, "llm_dim": self.llm_args.dim},
        )
        self.log_mel = LogMel(n_mels=self.encoder_args.n_mels)
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_id
        self.audio_id = self.llm_args.vocab_size  # `<|audio|>` (herd.adapters.speech_llama)
        self._skipped: dict[str, SkipCounter] = {}
        with torch.device("meta"):  # the placeholder count of a clip: the encoder's and adapter's strides
            self._shape_model = self._new_model()

    def _encoder_args(self) -> ConformerArgs:
        s = self.speech
        if s.init_encoder:
            loaded = ConformerArgs(**read_speech_encoder_config(s.init_encoder)["encoder_args"])
            if s.encoder_args and get_speech_preset(s.encoder, **s.encoder_args) != loaded:
                raise ValueError(
                    f"speech.encoder_args describe another encoder than speech.init_encoder ({s.init_encoder}) "
                    "holds: both set, and the encoder's architecture comes from its checkpoint"
                )
            return loaded
        return get_speech_preset(s.encoder, **s.encoder_args)

    # --- model ----------------------------------------------------------------------------------------
    def _new_model(self) -> SpeechLlama:
        return SpeechLlama(Llama(self.llm_args), ConformerEncoder(self.encoder_args), self.adapter_args)

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            model = self._new_model()
        if self.speech.trainable == "adapter":
            model.freeze_encoder()
        return model

    def init_weights(self, model: nn.Module) -> None:
        """Encoder and adapter as their constructors initialise them (seeded by the loop), the encoder from
        `speech.init_encoder` when given; the LLM from its checkpoint."""
        reference = self._new_model()
        reference.init_weights()
        if self.speech.init_encoder:
            reference.encoder.load_state_dict(load_speech_encoder(self.speech.init_encoder).state_dict())
        state = reference.state_dict()
        state.update({f"llm.{k}": v for k, v in self._llm_state.items()})
        own = model.state_dict().keys()
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        model.freeze_llm()  # type: ignore[operator]
        if self.speech.trainable == "adapter":
            model.freeze_encoder()  # type: ignore[operator]

    # --- data -----------------------------------------------------------------------------------------
    def task_prompt(self, sample: dict[str, Any]) -> tuple[str, str, str]:
        """(text before the audio, text after it, target) of a record (module docstring)."""
        objective = speech_objective(sample)
        if objective == "dialogue":
            answer = sample.get("response") or sample["answer"]
            return (
                str(sample.get("prompt", "")),
                str(sample.get("prompt_after", "")),
                f" {str(answer).strip()}",
            )
        if objective == "translation":
            before = f"Translate the following sentence into {self.speech.target_language}:"
            return before, "", f" {sample['translation'].strip()}"
        return f"Repeat after me in {self.speech.language}:", "", f" {sample['text'].strip()}"

    def prompt_tokens(self, before: str, n_audio: int, after: str = "") -> list[int]:
        tok = self.tokenizer
        head = [tok.bos_id, *(tok.encode(before) if before else [])]
        return head + [self.audio_id] * n_audio + (tok.encode(after) if after else [])

    def audio_tokens(self, feature_frames: int) -> int:
        return self._shape_model.audio_tokens(feature_frames)

    def features(self, audio: torch.Tensor, seed: int | None = None, augment: bool = False) -> torch.Tensor:
        """(N,) 16 kHz waveform → (T, n_mels) normalised log-mel (SpecAugment'ed when `augment`)."""
        mel, frames = self.log_mel(audio.reshape(1, -1))  # (1, T, n_mels)
        feats = normalize_per_utterance(mel, frames)[0]
        if augment and seed is not None:
            feats = spec_augment(feats, torch.Generator().manual_seed(int(seed)))
        return feats

    def encode(self, samples: list[dict[str, Any]], augment: bool = False) -> dict[str, Any]:
        """tokens/labels (B, S), audio_features (B, T, n_mels), audio_lengths (B,): one clip per row."""
        feats = [self.features(s["audio"], s.get("seed"), augment) for s in samples]
        rows, label_rows = [], []
        for s, f in zip(samples, feats):
            before, after, target = self.task_prompt(s)
            head = self.prompt_tokens(before, self.audio_tokens(f.shape[0]), after)
            tail = [*self.tokenizer.encode(target), self.eot_id]
            rows.append((head + tail)[:-1])
            label_rows.append([IGNORE_INDEX] * (len(head) - 1) + tail)  # predict the target tokens only
        S = max(map(len, rows))
        tokens = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            tokens[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
        features, lengths, _ = pad_features(feats)
        return {"tokens": tokens, "labels": labels, "audio_features": features, "audio_lengths": lengths}

    def encode_train(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.encode(samples, augment=self.speech.spec_augment)

    def val_batches(self):
        if not self.speech.val_manifest:
            return None
        return batches_of(self.dataset("val", loop=False), self.data.batch_size, self.encode)

    # --- the step -------------------------------------------------------------------------------------
    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch["tokens"],), {"audio_features": batch["audio_features"],
                                    "audio_lengths": batch["audio_lengths"]}  # fmt: skip

    def loss_from_output(self, logits: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        loss_sum, n = causal_lm_loss(logits, batch["labels"])  # logits (B, S, V)
        return LossOutput(loss_sum, n)

    # --- export ---------------------------------------------------------------------------------------
    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """Encoder + adapter in herd's speech layout (`herd.adapters.speech_io`), which `herd ask --audio`
        loads; the frozen LLM is referenced by path. Any `checkpoint.export_format` but "none" writes it."""
        if fmt == "none":
            return None
        assert self.speech.llm is not None
        return save_speech_state(
            state_dict, self.encoder_args, self.adapter_args, self.speech.llm, out_dir, self.speech.language
        )


__all__ = ["SpeechTask", "check_speech_record", "spec_augment", "speech_objective"]
