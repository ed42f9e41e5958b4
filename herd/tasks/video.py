"""Video adapter training (paper §7.2.3, §7.4.3): the video task of the one training loop.

A video model starts from a trained image model (`video.init_from`, a `herd train vision` export): its
LLM, image encoder, projector and image cross-attention layers are loaded, a perceiver resampler and
video cross-attention layers (gates at zero) are added, and, as in the paper, only these video-specific
parameters train (`video.trainable = "video"`; "adapter" or "all" unfreeze the image adapter or the
encoder too; the LLM never trains). Each sample is `<|begin_of_text|><|video|>` + prompt + target +
`<|eot_id|>`, the loss on the target only; `<|video|>` is the second of the adapter's image-token
embeddings (id vocab_size + 1), as `<|image|>` is the first.

Frames: `video.num_frames` sampled uniformly over each video (`herd.vision.video.read_frames`), each
frame through the image transform of the encoder; repeated or padded frames are masked from the
resampler. Data: a jsonl manifest or webdataset shards (`herd.data.training.video_text`); a record
without the fields the objective needs, or a video that cannot be read, is skipped and counted by
reason. Layouts: FSDP/HSDP and TP (`herd.plans.multimodal` covers the video blocks); no pipeline or
context parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.adapters.multimodal import MultimodalLlama
from herd.adapters.multimodal_io import WEIGHTS_FILE, read_multimodal_config, save_multimodal_state
from herd.adapters.perceiver import get_perceiver_preset
from herd.adapters.video import video_schedule
from herd.config import DataConfig, VideoConfig
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.data.training.video_text import VideoTextDataset
from herd.losses import causal_lm_loss
from herd.plans.multimodal import MULTIMODAL_PLAN
from herd.task import LossOutput, ResumableBatches, TaskBase
from herd.tasks.vision import batches_of, encode_targets, missing_fields, qa_prompt
from herd.text.loading import load_checkpoint
from herd.text.model import Llama
from herd.vision.encoder import VisionEncoder
from herd.vision.tiling import ImageTransform
from herd.vision.video import VideoFrames, collate_videos, video_tiles
from herd.vision.vision_args import VisionArgs


def vision_args_from(config: dict[str, Any]) -> VisionArgs:
    args = dict(config["vision_args"])
    args["aspect_ratios"] = [tuple(r) for r in args.get("aspect_ratios") or []] or None
    return VisionArgs(**args)


@dataclass
class FrameFeatures:
    """One clip's frozen image-encoder output (`video.cache_features`), in place of its frames."""

    features: torch.Tensor  # (F, K, N, Dv) the encoder's output per frame and tile
    aspect_ratio_ids: torch.Tensor  # (F,)
    aspect_ratio_mask: torch.Tensor  # (F, K)
    frame_mask: torch.Tensor  # bool (F,)


class FrozenFrameEncoder:
    """The image encoder of `init_from`, frozen, on CPU: a clip's sampled frames → `FrameFeatures`.

    The model's own encoder holds the same weights and never trains when this is used (the task refuses
    `trainable = "all"` with `cache_features`), so the cached output is what the model's forward would
    compute from the frames (up to float summation order: `tests/herd/test_video_task.py`)."""

    def __init__(self, vision_args: VisionArgs, weights: dict[str, torch.Tensor], transform: ImageTransform):
        self.encoder = VisionEncoder(vision_args)
        own = {k.removeprefix("vision."): v for k, v in weights.items() if k.startswith("vision.")}
        self.encoder.load_state_dict(own, strict=True)
        self.encoder.requires_grad_(False).eval()
        self.transform = transform
        self.calls = 0  # clips encoded (a test counts them)

    @torch.no_grad()
    def __call__(self, video: VideoFrames) -> FrameFeatures:
        tiles = video_tiles(video, self.transform)  # pixel_values (F, K, 3, S, S)
        self.calls += 1
        out = self.encoder(  # every frame as a one-image sample: (F, 1, K, N, Dv)
            tiles["pixel_values"][:, None],
            tiles["aspect_ratio_ids"][:, None],
            tiles["aspect_ratio_mask"][:, None],
        )
        return FrameFeatures(
            out[:, 0], tiles["aspect_ratio_ids"], tiles["aspect_ratio_mask"], tiles["frame_mask"]
        )


def collate_features(clips: list[FrameFeatures], num_frames: int) -> dict[str, torch.Tensor]:
    """`FrameFeatures` of a batch → the model's video inputs with `video_features` (B, F, K, N, Dv) in
    place of pixels; a clip with fewer frames is padded with masked zero frames, as `collate_videos` does."""
    B, (_, K, N, Dv) = len(clips), clips[0].features.shape
    feats = torch.zeros(B, num_frames, K, N, Dv, dtype=clips[0].features.dtype)
    ids = torch.zeros(B, num_frames, dtype=torch.long)
    tiles = torch.zeros(B, num_frames, K, dtype=torch.long)
    tiles[:, :, 0] = 1
    frame_mask = torch.zeros(B, num_frames, dtype=torch.bool)
    for b, c in enumerate(clips):
        n = c.features.shape[0]
        if n > num_frames:
            raise ValueError(f"a clip has {n} frames, more than video.num_frames={num_frames}")
        feats[b, :n], ids[b, :n], tiles[b, :n], frame_mask[b, :n] = (
            c.features,
            c.aspect_ratio_ids,
            c.aspect_ratio_mask,
            c.frame_mask,
        )
    return {"video_features": feats, "video_aspect_ratio_ids": ids, "video_aspect_ratio_mask": tiles,
            "video_frame_mask": frame_mask}  # fmt: skip


class CachedVideoTextDataset(VideoTextDataset):
    """Decodes each clip once and keeps it in memory (`video.cache_frames`): its sampled frames, or with
    `features` (`video.cache_features`) only the frozen encoder's output for them. For data that fits in
    RAM and is read for many epochs, such as the quickstart's (3,000 clips: ~220 MB of frames)."""

    def __init__(
        self, *args: Any, features: Callable[[VideoFrames], FrameFeatures] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple[str, int], Any] = {}
        self._features = features

    def _decode(self, rec: Any) -> Any:
        key = (rec.path, rec.offset)
        if key not in self._cache:
            frames = super()._decode(rec)
            self._cache[key] = frames if self._features is None else self._features(frames)
        return self._cache[key]


class VideoTask(TaskBase):
    """`herd train video`. Config sections: `[video]` (the image model to start from, the resampler,
    frames, objective and data) and `[data]` (batch size, seed)."""

    name = "video"
    layouts = frozenset({"fsdp", "hsdp", "tp"})
    plan = MULTIMODAL_PLAN
    sections = ("video", "data")

    def __init__(self, video: VideoConfig, data: DataConfig, tokenizer: Any | None = None) -> None:
        v = video
        if not v.init_from:
            raise ValueError("video.init_from: the image-adapter checkpoint to start from is required")
        if not (v.train_manifest or v.shards):
            raise ValueError("video.train_manifest or video.shards is required")
        if v.num_frames < 1 or v.video_every < 1 or v.caption_every < 1:
            raise ValueError("video.num_frames, video.video_every and video.caption_every must be ≥ 1")
        self.video, self.data = video, data
        self.image_config = read_multimodal_config(v.init_from)
        if self.image_config.get("video") is not None:
            raise ValueError(
                f"{v.init_from}: already has a video adapter; video.init_from takes an image model"
            )
        self.llm_path = self.image_config["llm"]
        self.llm_args, self._llm_state = load_checkpoint(self.llm_path)
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.llm_path, vocab_size=self.llm_args.vocab_size)
        self.tokenizer = tokenizer
        self.model_args = self.llm_args
        self.vision_args = vision_args_from(self.image_config)
        self.max_tiles = int(self.image_config["max_tiles"])
        self.cross_attention_layers = [int(i) for i in self.image_config["cross_attention_layers"]]
        try:
            self.perceiver_args = get_perceiver_preset(
                v.perceiver, **{"dim": self.llm_args.dim, **v.perceiver_args}
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"video.perceiver / video.perceiver_args: {e}") from e
        if self.perceiver_args.num_groups(v.num_frames) > self.perceiver_args.max_groups:
            raise ValueError(
                f"video.num_frames={v.num_frames} needs {self.perceiver_args.num_groups(v.num_frames)} groups of "
                f"{self.perceiver_args.frames_per_group}; the resampler has {self.perceiver_args.max_groups}"
            )
        self.video_layers = video_schedule(self.cross_attention_layers, v.video_every)
        self.transform = ImageTransform(tile_size=self.vision_args.image_size, max_tiles=self.max_tiles)
        self.video_id = self.llm_args.vocab_size + 1  # `<|video|>`: the adapter's second image-token row
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_id
        self.check_record = missing_fields(v.objective)
        if v.cache_features and v.trainable == "all":
            raise ValueError(
                'video.cache_features keeps the frozen image encoder\'s output, but video.trainable = "all" '
                "trains the encoder: use cache_frames instead"
            )
        self._frame_encoder: FrozenFrameEncoder | None = None
        self._skipped: dict[str, SkipCounter] = {}

    # --- model ----------------------------------------------------------------------------------------
    def _new_model(self) -> MultimodalLlama:
        return MultimodalLlama(
            Llama(self.llm_args),
            VisionEncoder(self.vision_args),
            cross_attention_layers=self.cross_attention_layers,
            video=self.perceiver_args,
            video_every=self.video.video_every,
        )

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            model = self._new_model()
        self.freeze(model)  # here, not only in init_weights: a distributed run copies weights, not flags
        return model

    def init_weights(self, model: nn.Module) -> None:
        """The image model's weights from `init_from` and the LLM from its checkpoint; the video adapter
        as its constructor initialises it (seeded: every rank draws the same). Then the freezing rule."""
        from safetensors.torch import load_file

        reference = self._new_model()
        state = reference.state_dict()
        image = load_file(str(Path(self.video.init_from) / WEIGHTS_FILE))  # type: ignore[arg-type]
        unknown = sorted(set(image) - set(state))
        if unknown:
            raise ValueError(f"{self.video.init_from}/{WEIGHTS_FILE}: unexpected weights {unknown[:5]}")
        state.update(image)
        state.update({f"llm.{k}": v for k, v in self._llm_state.items()})
        if self.video.init_cross_attention == "image":  # a copy of the image block at the same layer
            for key in self.video_layers:
                for name, value in image.items():
                    if name.startswith(f"cross_attention.{key}."):
                        leaf = name.removeprefix(f"cross_attention.{key}.")
                        zero = leaf in ("gate_attn", "gate_ffwd")  # the gates stay shut: nothing changes
                        state[f"video.cross_attention.{key}.{leaf}"] = (
                            torch.zeros_like(value) if zero else value
                        )
        model.load_state_dict(state, strict=True)
        self.freeze(model)

    def freeze(self, model: nn.Module) -> None:
        """`video.trainable`: video = the resampler and video cross-attention only (the paper);
        adapter = also projector, image cross-attention and image-token rows; all = also the encoder."""
        keep = {"video": ("video.",),
                "adapter": ("video.", "projector.", "cross_attention.", "image_token_embeddings."),
                "all": ("video.", "projector.", "cross_attention.", "image_token_embeddings.", "vision.")}  # fmt: skip
        prefixes = keep[self.video.trainable]
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))

    # --- data -----------------------------------------------------------------------------------------
    def target_text(self, sample: dict[str, Any], row: int = 0) -> tuple[str, str]:
        objective = self.video.objective
        if objective == "mixed":
            has_caption = bool(sample.get("caption") or sample.get("text"))
            caption_row = row % self.video.caption_every == 0
            objective = "caption" if (caption_row and has_caption) or not sample.get("question") else "qa"
        if objective == "caption":
            return "", str(sample.get("caption") or sample["text"])
        return qa_prompt(sample["question"]), f" {sample.get('response') or sample['answer']}"

    def prompt_tokens(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, self.video_id, *self.tokenizer.encode(prompt)]

    def video_inputs(self, videos: list[Any]) -> dict[str, torch.Tensor]:
        """`VideoFrames` of a batch → the model's `video_*` inputs (`collate_videos`)."""
        return collate_videos([video_tiles(v, self.transform) for v in videos], self.video.num_frames)

    def frame_encoder(self) -> FrozenFrameEncoder:
        """The frozen encoder behind `video.cache_features`, loaded from `init_from` on first use."""
        if self._frame_encoder is None:
            from safetensors.torch import load_file

            weights = load_file(str(Path(self.video.init_from) / WEIGHTS_FILE))  # type: ignore[arg-type]
            self._frame_encoder = FrozenFrameEncoder(self.vision_args, weights, self.transform)
        return self._frame_encoder

    def encode(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens, labels = encode_targets(self, samples)
        videos = [s["video"] for s in samples]
        if all(isinstance(v, FrameFeatures) for v in videos):
            return {"tokens": tokens, "labels": labels, **collate_features(videos, self.video.num_frames)}
        return {"tokens": tokens, "labels": labels, **self.video_inputs(videos)}

    def dataset(self, split: str, rank: int = 0, world_size: int = 1, loop: bool = True) -> VideoTextDataset:
        v = self.video
        kw = {"rank": rank, "world_size": world_size, "seed": self.data.seed, "loop": loop, "shuffle": loop,
              "check": self.check_record, "num_frames": v.num_frames, "backend": v.backend}  # fmt: skip
        kind = VideoTextDataset
        if (v.cache_frames or v.cache_features) and split == "train":
            kind = CachedVideoTextDataset
            kw["features"] = self.frame_encoder() if v.cache_features else None
        if split == "val":
            data = kind.from_jsonl(v.val_manifest, **kw)
        elif v.shards:
            data = kind.from_tar_shards(v.shards, **kw)
        else:
            data = kind.from_jsonl(v.train_manifest, **kw)
        self._skipped[split] = data.skipped
        return data

    def skip_counts(self) -> dict[str, SkipCounter]:
        return dict(self._skipped)

    def train_batches(self, rank: int, world_size: int) -> ResumableBatches:
        self.train_data = self.dataset("train", rank, world_size)
        return ResumableBatches(self.train_data, self.data.batch_size // world_size, self.encode)

    def val_batches(self):
        if not self.video.val_manifest:
            return None
        return batches_of(self.dataset("val", loop=False), self.data.batch_size, self.encode)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        pixels = "video_features" if "video_features" in batch else "video_pixel_values"
        keys = (pixels, "video_aspect_ratio_ids", "video_aspect_ratio_mask", "video_frame_mask")
        return (batch["tokens"],), {k: batch[k] for k in keys}

    def loss_from_output(self, logits: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        loss_sum, n = causal_lm_loss(logits, batch["labels"])  # logits (B, T, V)
        return LossOutput(loss_sum, n)

    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """The image adapter (as it was, or as trained with trainable="adapter"/"all") and the video
        adapter in herd's multimodal layout (`vision.json` with a "video" entry), which `herd ask --video`
        loads; the LLM is referenced by path. Any `checkpoint.export_format` but "none" writes it."""
        if fmt == "none":
            return None
        video = {"perceiver_args": self.perceiver_args, "cross_attention_layers": self.video_layers,
                 "num_frames": self.video.num_frames}  # fmt: skip
        return save_multimodal_state(
            state_dict,
            self.vision_args,
            self.cross_attention_layers,
            self.llm_path,
            self.max_tiles,
            out_dir,
            video,
        )
