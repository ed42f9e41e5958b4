"""The served model: any herd checkpoint behind one interface that turns chat turns into a batcher `Job`.

    text     a `load_pretrained` directory (Meta or Hugging Face layout)
    image    a vision adapter (`vision.json`, `herd.adapters.multimodal_io`), + video when it has one
    speech   a speech adapter (`speech.json`, `herd.adapters.speech_io`)

Two prompt formats (`prompt_format`; "auto": chat for a text checkpoint, plain for an adapter):

    chat    herd's Llama 3 chat format (`herd.text.chat_format.ChatFormat`): each message is its header,
            its parts in order and `<|eot_id|>`, then the assistant header — for chat-tuned models.
    plain   the prompts herd's adapter tasks train on and `herd ask` writes (`herd.ask.VisionQA` /
            `VideoQA` / `SpeechQA`): `<|begin_of_text|>`, then each user turn's parts — an image or
            video model's question wrapped as "Question: … Answer:" after its `<|image|>`/`<|video|>`
            token, a speech model's text and audio as they stand ("Repeat after me in English:" + the
            clip) — and each earlier reply as " reply". System turns are left out (no adapter task
            trains with one). A one-turn request is then token for token `herd ask`'s prompt.

In both, a text part is encoded as plain text (special-token strings in it stay text), an image part is
the model's `<|image|>` token, a video part `<|video|>`, an audio part one `<|audio|>` placeholder per
80 ms adapter frame.

Where a request decodes: a prompt with an image or video is decoded alone (its steps read the image's
cross-attention K/V); everything else — text, and audio, which only enters through the prompt's
embeddings — shares the batch on the base LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.ask import real_vocab
from herd.serving.batcher import Job
from herd.serving.media import RequestError, decode_audio, decode_image, decode_video
from herd.text.chat_format import ChatFormat
from herd.text.generation import SamplingParams, prefill
from herd.text.kv_cache import KVCache

PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass
class Part:
    kind: str  # "text" | "image" | "video" | "audio"
    where: str  # e.g. "messages[0].content[1]", for error messages
    text: str = ""
    data: bytes = b""
    fmt: str = ""  # audio: "wav" | "mp3"


@dataclass
class Turn:
    role: str  # system | user | assistant | tool
    parts: list[Part] = field(default_factory=list)


class ServedModel:
    """A loaded checkpoint, its tokenizer and chat format, and what inputs it takes (`modalities`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        kind: str,
        name: str,
        config: dict[str, Any],
        prompt_format: str = "auto",
    ) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}"
            )
        # herd's adapter tasks train on plain prompts (herd.tasks.vision.qa_prompt, the speech task's)
        self.prompt_format = (
            prompt_format if prompt_format != "auto" else ("chat" if kind == "text" else "plain")
        )
        self.model, self.tokenizer, self.kind, self.name, self.config = (
            model.eval(),
            tokenizer,
            kind,
            name,
            config,
        )
        self.llm = getattr(model, "llm", model)  # the base Llama every batched step runs on
        self.format = ChatFormat(tokenizer)
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.max_seq_len = int(self.llm.args.max_seq_len)
        self.device = next(self.llm.parameters()).device
        self.vocab_limit = real_vocab(self.llm, tokenizer)  # never draw a padded embedding's extra ids
        self.modalities: set[str] = set()
        if kind == "image":
            from herd.vision.tiling import ImageTransform

            self.modalities.add("image")
            self.transform = ImageTransform(
                tile_size=model.vision.args.image_size, max_tiles=config["max_tiles"]
            )
            if model.video is not None:
                self.modalities.add("video")
                video = config.get("video") or {}
                self.num_frames = int(video.get("num_frames") or model.video.args.frames_per_group)
        elif kind == "speech":
            from herd.speech.features import LogMel

            self.modalities.add("audio")
            self.log_mel = LogMel(n_mels=model.encoder.args.n_mels)

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", name: str | None = None, prompt_format: str = "auto"
    ) -> ServedModel:
        root = Path(path)
        name = name or root.resolve().name
        if (root / "vision.json").is_file():
            from herd.adapters.multimodal_io import load_multimodal_model

            model, tok, config = load_multimodal_model(root, device)
            return cls(model, tok, "image", name, config, prompt_format)
        if (root / "speech.json").is_file():
            from herd.adapters.speech_io import load_speech_model

            model, tok, config = load_speech_model(root, device)
            return cls(model, tok, "speech", name, config, prompt_format)
        from herd.text.loading import load_pretrained

        model, tok = load_pretrained(root, device=device)
        return cls(model, tok, "text", name, {}, prompt_format)

    # --- prompts -------------------------------------------------------------------------------------
    def check_modalities(self, turns: list[Turn]) -> None:
        for turn in turns:
            for part in turn.parts:
                if part.kind != "text" and part.kind not in self.modalities:
                    raise RequestError(400, f"{part.where}: this model has no {part.kind} encoder")
                if part.kind != "text" and turn.role != "user":
                    raise RequestError(400, f"{part.where}: only user messages may carry {part.kind}")
        media = [p for t in turns for p in t.parts if p.kind in ("image", "video")]
        if len(media) > 1:  # the adapters were trained with one image or one video per sample
            raise RequestError(
                400, f"{media[1].where}: this server takes at most one image or video per request"
            )

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def job(self, turns: list[Turn], params: SamplingParams) -> Job:
        """Decode the media, build the prompt and its prefill; `emit` is set by the caller. Runs on a
        worker thread of the web server (decoding media is slow); the model itself is not touched."""
        self.check_modalities(turns)
        chat = self.prompt_format == "chat"
        tokens: list[int] = [self.format.bos_id]
        images, video, clips = [], None, []
        for turn in turns:
            if chat:
                tokens += self.format.encode_header(turn.role if turn.role != "tool" else "ipython")
            elif turn.role not in ("user", "assistant"):
                continue  # plain prompts carry only questions and replies
            for part in self._plain_parts(turn, first=len(tokens) == 1) if not chat else turn.parts:
                if part.kind == "text":
                    tokens += self.encode_text(part.text)
                elif part.kind == "image":
                    images.append(self.transform(decode_image(part.data, part.where)))
                    tokens.append(self.llm.args.vocab_size)  # `<|image|>` (herd.tasks.vision)
                elif part.kind == "video":
                    video = decode_video(part.data, self.num_frames, part.where)
                    tokens.append(self.llm.args.vocab_size + 1)  # `<|video|>` (herd.tasks.video)
                else:
                    clip = decode_audio(part.data, part.fmt, part.where, max_seconds=600.0)
                    feats = self._features(clip)
                    clips.append(feats)
                    tokens += [self.model.audio_token_id] * self.model.audio_tokens(feats.shape[0])
            if chat:
                tokens.append(self.format.eot_id)
        if chat:
            tokens += self.format.encode_header("assistant")
        if len(tokens) >= self.max_seq_len:
            raise RequestError(
                400, f"the prompt ({len(tokens)} tokens) does not fit the model's context {self.max_seq_len}"
            )
        job = Job(prompt=tokens, params=params, emit=lambda e: None)
        if images or video is not None:
            job.prefill, job.solo = self._image_prefill(tokens, images, video), self.model
        elif clips:
            job.prefill = self._audio_prefill(tokens, clips)
        return job

    def _plain_parts(self, turn: Turn, first: bool) -> list[Part]:
        """A turn's parts as the plain prompt writes them: a reply as " reply"; an image/video model's
        user turn as its media, then its text as one "Question: … Answer:"; a speech or text model's
        user turn unchanged (its text is the instruction around the clip)."""
        space = "" if first else " "
        text = " ".join(p.text.strip() for p in turn.parts if p.kind == "text" and p.text.strip())
        where = next((p.where for p in turn.parts if p.kind == "text"), "")
        if turn.role == "assistant":
            return [Part("text", where, text=f" {text}")] if text else []
        if self.kind != "image":
            parts = list(turn.parts)
            if parts and parts[0].kind == "text" and space:
                parts[0] = Part("text", parts[0].where, text=space + parts[0].text)
            return parts
        from herd.tasks.vision import qa_prompt

        media = [p for p in turn.parts if p.kind != "text"]
        return [*media, Part("text", where, text=space + qa_prompt(text))] if text else media

    def _features(self, clip: torch.Tensor) -> torch.Tensor:
        """(N,) 16 kHz → normalised log-mel (T, n_mels), as `herd.ask.SpeechQA` and training do."""
        from herd.speech.features import normalize_per_utterance

        mel, frames = self.log_mel(clip.reshape(1, -1).float())
        return normalize_per_utterance(mel, frames)[0]

    def _image_prefill(self, tokens: list[int], images: list[Any], video: Any) -> Any:
        """The prefill `herd.adapters.generate_with_images` makes for one row: bind, cache, prefill."""
        if images:
            from herd.vision.tiling import collate_images

            batch = collate_images(images, max_images_per_sample=1)
            # every position sees the image, as `herd.ask.VisionQA` and the vision task's training
            batch["cross_attention_mask"] = (
                batch["aspect_ratio_mask"][:, None].expand(-1, len(tokens), -1, -1).clone()
            )
            inputs = {
                k: batch[k]
                for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
            }
        else:
            from herd.vision.video import collate_videos, video_tiles

            inputs = collate_videos([video_tiles(video, self.transform)], self.num_frames)
        return self._bound_prefill(
            tokens, lambda: self.model.bind_images(**_to(inputs, self.device)), self.model.clear_images
        )

    def _audio_prefill(self, tokens: list[int], clips: list[torch.Tensor]) -> Any:
        """The prefill `herd.adapters.speech_llama.generate_with_audio` makes for one row."""
        from herd.speech.features import pad_features

        features, lengths, _ = pad_features(clips)
        bind = lambda: self.model.bind_audio([tokens], features.to(self.device), lengths.to(self.device))
        return self._bound_prefill(tokens, bind, self.model.clear_audio)

    def _bound_prefill(self, tokens: list[int], bind: Any, clear: Any) -> Any:
        def run(total: int) -> tuple[KVCache, torch.Tensor]:
            bind()  # on the batcher's thread: the only one that touches the model
            try:
                cache = self.model.new_kv_cache(1, total)
                ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
                return cache, prefill(self.model, ids, cache)
            finally:
                clear()

        return run

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "modalities": sorted(self.modalities), "max_model_len": self.max_seq_len,
                "prompt_format": self.prompt_format}  # fmt: skip


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


__all__ = ["Part", "ServedModel", "Turn"]
