"""Image question answering with a trained vision adapter: `herd ask` and its Python API.

    qa = VisionQA.load("runs/quickstart/vision_model")
    qa.ask([read_image("shapes.png")], ["How many shapes are there?"])

The checkpoint format (`vision.json` + `adapter.safetensors`, the frozen LLM loaded from its own
checkpoint) lives with the model: `herd.adapters.multimodal_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from herd.adapters.multimodal import MultimodalLlama, generate_with_images
from herd.adapters.multimodal_io import load_multimodal_model
from herd.tasks.vision import qa_prompt
from herd.text.generation import SamplingParams
from herd.vision.tiling import ImageTransform, collate_images


def read_image(path: str | Path) -> Image.Image:
    """An image file as RGB, decoded now. A missing file raises FileNotFoundError, an unreadable one or
    one too large to decode safely (PIL's decompression-bomb limit, `Image.MAX_IMAGE_PIXELS`, which fires
    on the header alone) ValueError; both name the file, which PIL's own errors do not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError and truncated files: OSError
        raise ValueError(f"{path}: cannot read image: {e}") from e


def real_vocab(model: Any, tokenizer: Any) -> int | None:
    """The ids a model may answer with: a trimmed tokenizer under a padded embedding decodes the padding
    ids to nothing, so they are never drawn (as `herd generate` and `herd serve` do); None: all."""
    args = getattr(getattr(model, "llm", model), "args", None) or model.args
    vocab = int(getattr(tokenizer, "vocab_size", args.vocab_size))
    return vocab if vocab < args.vocab_size else None


class VisionQA:
    """Answers questions about images with a frozen LLM + trained vision adapter."""

    def __init__(self, model: MultimodalLlama, tokenizer: Any, max_tiles: int) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.transform = ImageTransform(tile_size=model.vision.args.image_size, max_tiles=max_tiles)
        self.image_id = model.args.vocab_size  # Mllama's `<|image|>` convention (see herd.tasks.vision)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> VisionQA:
        model, tokenizer, config = load_multimodal_model(path, device)
        return cls(model, tokenizer, config["max_tiles"])

    @torch.no_grad()
    def ask(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """One answer per (image, question) pair; all pairs run as one batch."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        tok = self.tokenizer
        prompts = [[tok.bos_id, self.image_id, *tok.encode(qa_prompt(q))] for q in questions]
        batch = collate_images([self.transform(img) for img in images], max_images_per_sample=1)
        T = max(map(len, prompts))
        xmask = batch["aspect_ratio_mask"][:, None].expand(-1, T, -1, -1).clone()
        pad = tok.pad_id if tok.pad_id >= 0 else 0
        done = generate_with_images(
            self.model, prompts, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"],
            xmask, SamplingParams(max_new_tokens=max_new_tokens), stop_ids=tok.stop_ids, pad_id=pad,
            vocab_limit=real_vocab(self.model, tok),
        )  # fmt: skip
        return [tok.decode(c.tokens).strip() for c in done]


class VideoQA:
    """Answers questions about videos with a frozen LLM + image adapter + trained video adapter
    (a `herd train video` export, or the video quickstart's `video_model`)."""

    def __init__(self, model: MultimodalLlama, tokenizer: Any, max_tiles: int, num_frames: int) -> None:
        if model.video is None:
            raise ValueError("this checkpoint has no video adapter: train one with `herd train video`")
        self.model, self.tokenizer, self.num_frames = model.eval(), tokenizer, num_frames
        self.transform = ImageTransform(tile_size=model.vision.args.image_size, max_tiles=max_tiles)
        self.video_id = model.args.vocab_size + 1  # `<|video|>` (see herd.tasks.video)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", num_frames: int | None = None) -> VideoQA:
        """`num_frames` default: what the model was trained with (vision.json's video.num_frames), else
        the resampler's frames per group."""
        model, tokenizer, config = load_multimodal_model(path, device)
        if model.video is None:
            raise ValueError(f"{path}: has no video adapter: train one with `herd train video`")
        frames = num_frames or config["video"].get("num_frames") or model.video.args.frames_per_group
        return cls(model, tokenizer, config["max_tiles"], int(frames))

    def read(self, path: str | Path, backend: str = "auto") -> Any:
        """`num_frames` frames sampled uniformly over the video at `path` (`VideoReadError` names it)."""
        from herd.vision.video import read_frames

        return read_frames(path, self.num_frames, backend)  # type: ignore[arg-type]

    @torch.no_grad()
    def ask(self, videos: list[Any], questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """One answer per (video, question) pair, as one batch; `videos` are `VideoFrames` (`read`)."""
        from herd.vision.video import collate_videos, video_tiles

        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
        tok = self.tokenizer
        prompts = [[tok.bos_id, self.video_id, *tok.encode(qa_prompt(q))] for q in questions]
        batch = collate_videos([video_tiles(v, self.transform) for v in videos], self.num_frames)
        pad = tok.pad_id if tok.pad_id >= 0 else 0
        done = generate_with_images(
            self.model, prompts, params=SamplingParams(max_new_tokens=max_new_tokens), stop_ids=tok.stop_ids,
            pad_id=pad, vocab_limit=real_vocab(self.model, tok), **batch,
        )  # fmt: skip
        return [tok.decode(c.tokens).strip() for c in done]


class SpeechQA:
    """Transcribes clips or answers spoken questions with a frozen LLM + trained speech encoder and adapter
    (a `herd train speech` export, or the speech quickstart's `speech_model`)."""

    def __init__(self, model: Any, tokenizer: Any, language: str = "English") -> None:
        from herd.speech.features import LogMel

        self.model, self.tokenizer, self.language = model.eval(), tokenizer, language
        self.log_mel = LogMel(n_mels=model.encoder.args.n_mels)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SpeechQA:
        from herd.adapters.speech_io import load_speech_model

        model, tokenizer, config = load_speech_model(path, device)
        return cls(model, tokenizer, config.get("language", "English"))

    @staticmethod
    def read(path: str | Path, max_seconds: float | None = 600.0) -> torch.Tensor:
        """The clip at `path` as a 16 kHz mono waveform (N,); `AudioError` names the file and the reason."""
        from herd.speech.audio import read_audio

        return read_audio(path, max_seconds=max_seconds)

    def transcribe_prompt(self) -> str:
        return f"Repeat after me in {self.language}:"  # the paper's ASR prompt (§8.3.1)

    @torch.no_grad()
    def ask(
        self, clips: list[torch.Tensor], prompts: list[str | None], max_new_tokens: int = 32, after: str = ""
    ) -> list[str]:
        """One reply per clip, as one batch. A prompt is the text before the clip (`transcribe_prompt()`
        transcribes; "Translate the following sentence into French:" translates); None: the clip is a
        spoken question or turn and is answered as it stands. `after`: text between the clip and the reply."""
        from herd.adapters.speech_llama import generate_with_audio
        from herd.speech.features import normalize_per_utterance, pad_features

        if len(clips) != len(prompts):
            raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
        tok, model = self.tokenizer, self.model
        feats = []
        for clip in clips:
            mel, frames = self.log_mel(clip.reshape(1, -1).float())
            feats.append(normalize_per_utterance(mel, frames)[0])  # (T, n_mels), as in training
        rows = []
        for text, f in zip(prompts, feats):
            n = model.audio_tokens(f.shape[0])
            head = [tok.bos_id, *(tok.encode(text) if text else [])]
            rows.append(head + [model.audio_token_id] * n + (tok.encode(after) if after else []))
        features, lengths, _ = pad_features(feats)
        pad = tok.pad_id if tok.pad_id >= 0 else 0
        done = generate_with_audio(
            model, rows, features, lengths, SamplingParams(max_new_tokens=max_new_tokens),
            stop_ids=tok.stop_ids, pad_id=pad, vocab_limit=real_vocab(model, tok),
        )  # fmt: skip
        return [tok.decode(c.tokens).strip() for c in done]
