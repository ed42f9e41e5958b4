"""Image adapter training on a frozen LLM (paper §7): the vision task of the one training loop.

The LLM comes from a checkpoint and never changes (requires_grad False, so it is not in the
optimizer); the image encoder, projector and gated cross-attention layers train. Each sample is
`<|begin_of_text|><|image|>` + prompt + target + `<|eot_id|>` with the loss on the target only: the
answer of a visual question ("Question: What color is the square? Answer: red") or a caption.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from herd.adapters.multimodal import MultimodalLlama
from herd.config import JobConfig
from herd.data.image_text import ImageTextDataset
from herd.data.packed_text import IGNORE_INDEX
from herd.tasks.text import causal_lm_loss
from herd.text.loading import load_checkpoint
from herd.text.model import Llama
from herd.trainer import LossOutput
from herd.vision.encoder import VisionEncoder, load_vision_weights
from herd.vision.tiling import ImageTransform, collate_images
from herd.vision.vision_args import get_vision_preset


def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


class VisionBatches:
    """Collated batches from an `ImageTextDataset`; its position is the state a checkpoint saves."""

    def __init__(self, dataset: ImageTextDataset, batch_size: int, encode) -> None:
        self.dataset, self.batch_size, self.encode = dataset, batch_size, encode
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> VisionBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.dataset)
        return self.encode([next(self._it) for _ in range(self.batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._it = None


class VisionTask:
    def __init__(self, cfg: JobConfig, tokenizer: Any | None = None) -> None:
        v = cfg.vision
        if not v.llm:
            raise ValueError("vision.llm: the frozen LLM checkpoint to build on is required")
        if v.objective not in ("qa", "caption", "mixed"):
            raise ValueError(f"vision.objective must be qa, caption or mixed, got {v.objective!r}")
        if v.caption_every < 1:
            raise ValueError(f"vision.caption_every must be ≥ 1, got {v.caption_every}")
        if cfg.parallel.pp > 1:
            raise ValueError("pipeline parallelism is not implemented for the vision task yet; use FSDP/TP")
        self.cfg = cfg
        self.llm_args, self._llm_state = load_checkpoint(v.llm)
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(v.llm, vocab_size=self.llm_args.vocab_size)
        self.tokenizer = tokenizer
        self.model_args = self.llm_args  # for the runtime's init-mode choice and exports
        self.vision_args = get_vision_preset(v.encoder, **{"max_num_tiles": v.max_tiles, **v.encoder_args})
        self.transform = ImageTransform(tile_size=self.vision_args.image_size, max_tiles=v.max_tiles)
        # Mllama's convention: `<|image|>` is id vocab_size, the first of the adapter's trainable
        # image-token embeddings (128256 for Llama 3); the frozen LLM's own rows are never used for it
        self.image_id = self.llm_args.vocab_size
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_id
        if not (v.train_manifest or v.shards):
            raise ValueError("vision.train_manifest or vision.shards is required")

    # --- model ----------------------------------------------------------------------------------------
    def _new_model(self) -> MultimodalLlama:
        return MultimodalLlama(
            Llama(self.llm_args),
            VisionEncoder(self.vision_args),
            cross_attention_every=self.cfg.vision.cross_attention_every,
        )

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return self._new_model()

    def init_weights(self, model: nn.Module) -> None:
        """Encoder and adapter as their constructors initialise them (seeded); the LLM from its
        checkpoint; optionally the encoder trunk from an open_clip/timm checkpoint."""
        reference = self._new_model()
        state = reference.state_dict()
        state.update({f"llm.{k}": v for k, v in self._llm_state.items()})
        model.load_state_dict(state, strict=True)
        if self.cfg.vision.encoder_weights:
            load_vision_weights(model.vision, self.cfg.vision.encoder_weights)
        model.freeze_llm()

    # --- data -----------------------------------------------------------------------------------------
    def target_text(self, sample: dict[str, Any], row: int = 0) -> tuple[str, str]:
        """(prompt, target) of a sample; with the "mixed" objective every `caption_every`-th row of a
        batch is a caption."""
        objective = self.cfg.vision.objective
        if objective == "mixed":
            objective = "caption" if row % self.cfg.vision.caption_every == 0 else "qa"
        if objective == "caption":
            return "", sample.get("caption") or sample["text"]
        return qa_prompt(sample["question"]), f" {sample.get('response') or sample['answer']}"

    def prompt_tokens(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, self.image_id, *self.tokenizer.encode(prompt)]

    def encode(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, label_rows = [], []
        for row, s in enumerate(samples):
            prompt, target = self.target_text(s, row)
            head = self.prompt_tokens(prompt)
            tail = [*self.tokenizer.encode(target), self.eot_id]
            seq = head + tail
            rows.append(seq[:-1])
            label_rows.append([IGNORE_INDEX] * (len(head) - 1) + tail)  # predict the target tokens only
        T = max(map(len, rows))
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            tokens[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
        images = collate_images([self.transform(s["image"]) for s in samples], max_images_per_sample=1)
        # every text token may look at every real tile of its image: (B, T, 1, tiles)
        xmask = images["aspect_ratio_mask"][:, None].expand(-1, T, -1, -1).clone()
        return {"tokens": tokens, "labels": labels, "pixel_values": images["pixel_values"],
                "aspect_ratio_ids": images["aspect_ratio_ids"], "aspect_ratio_mask": images["aspect_ratio_mask"],
                "cross_attention_mask": xmask}  # fmt: skip

    def dataset(self, split: str, rank: int = 0, world_size: int = 1, loop: bool = True) -> ImageTextDataset:
        v = self.cfg.vision
        kw = {
            "rank": rank,
            "world_size": world_size,
            "seed": self.cfg.data.seed,
            "loop": loop,
            "shuffle": loop,
        }
        if split == "val":
            return ImageTextDataset.from_jsonl(v.val_manifest, **kw)
        if v.shards:
            return ImageTextDataset.from_tar_shards(v.shards, **kw)
        return ImageTextDataset.from_jsonl(v.train_manifest, **kw)

    def train_batches(self, rank: int, world_size: int) -> VisionBatches:
        self.train_data = self.dataset("train", rank, world_size)
        return VisionBatches(self.train_data, self.cfg.data.batch_size // world_size, self.encode)

    def val_batches(self):
        if not self.cfg.vision.val_manifest:
            return None
        data, b = self.dataset("val", loop=False), self.cfg.data.batch_size
        batch: list[dict[str, Any]] = []
        for sample in data:
            batch.append(sample)
            if len(batch) == b:
                yield self.encode(batch)
                batch = []

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        logits = model(
            batch["tokens"],
            pixel_values=batch["pixel_values"],
            aspect_ratio_ids=batch["aspect_ratio_ids"],
            aspect_ratio_mask=batch["aspect_ratio_mask"],
            cross_attention_mask=batch["cross_attention_mask"],
        )
        loss_sum, n = causal_lm_loss(logits, batch["labels"])
        return LossOutput(loss_sum, n)

    def flops_per_target(self) -> float | None:
        return None


def _normalized(answer: str) -> str:
    return " ".join(w.strip(".,!?") for w in answer.lower().split())


def answer_is_correct(sample: dict[str, Any], generated: str) -> bool:
    """A sample with a `response` (the full answer trained on, e.g. "the square is red") is answered
    right when the whole answer equals it, ignoring case and punctuation: the right colour of the
    wrong object is wrong. Without one, the answer's first word must equal `answer`."""
    if sample.get("response"):
        return _normalized(generated) == _normalized(sample["response"])
    words = _normalized(generated).split()
    return bool(words) and words[0] == _normalized(str(sample["answer"]))


@torch.no_grad()
def evaluate_vqa(
    model: MultimodalLlama, task: VisionTask, samples: list[dict[str, Any]], batch_size: int = 32
) -> dict[str, Any]:
    """Greedy answers to each sample's question; accuracy per `question_type` (`answer_is_correct`)."""
    from herd.adapters.multimodal import generate_with_images
    from herd.text.generation import SamplingParams

    model.eval()
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = [task.prompt_tokens(qa_prompt(s["question"])) for s in chunk]
        images = collate_images([task.transform(s["image"]) for s in chunk], max_images_per_sample=1)
        T = max(map(len, prompts))
        xmask = images["aspect_ratio_mask"][:, None].expand(-1, T, -1, -1).clone()
        done = generate_with_images(
            model, prompts, images["pixel_values"], images["aspect_ratio_ids"], images["aspect_ratio_mask"],
            xmask, SamplingParams(max_new_tokens=8), stop_ids=task.tokenizer.stop_ids, pad_id=task.pad_id,
        )  # fmt: skip
        answers += [task.tokenizer.decode(c.tokens) for c in done]
    correct: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers):
        correct.setdefault(s.get("question_type", "all"), []).append(answer_is_correct(s, a))
    return {
        "accuracy": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
        "answers": answers,
    }
