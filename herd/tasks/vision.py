"""Image adapter training on a frozen LLM (paper §7): the vision task of the one training loop.

The LLM comes from a checkpoint and never changes (requires_grad False, so it is not in the
optimizer); the image encoder, projector and gated cross-attention layers train. Each sample is
`<|begin_of_text|><|image|>` + prompt + target + `<|eot_id|>` with the loss on the target only: the
answer of a visual question ("Question: What color is the square? Answer: red") or a caption.

Data contract: a manifest record the objective cannot use (no question, no answer, no caption) is
skipped and counted by reason when the manifest is indexed, as is an image that cannot be decoded when
it is read; the loop logs the counts. Layouts: FSDP/HSDP, TP, and PP with the paper's stage layout
(`herd.plans.multimodal`); not context parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.adapters.multimodal import MultimodalLlama, fusion_schedule
from herd.adapters.multimodal_io import save_multimodal_state
from herd.config import DataConfig, VisionConfig
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.data.training.image_text import ImageTextDataset
from herd.losses import causal_lm_loss
from herd.plans.multimodal import MULTIMODAL_PLAN
from herd.task import LayoutNotSupported, LossOutput, ResumableBatches, TaskBase
from herd.text.loading import load_checkpoint
from herd.text.model import Llama
from herd.vision.encoder import VisionEncoder, load_vision_weights
from herd.vision.tiling import ImageTransform, collate_images
from herd.vision.vision_args import get_vision_preset


def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def _text(fields: dict[str, Any], key: str) -> bool:
    value = fields.get(key)
    return isinstance(value, str) and bool(value.strip()) or isinstance(value, int | float)


def missing_fields(objective: str):
    """The record check of an objective: fields → the skip reason, or None when the record is usable.
    qa needs a question and an answer (or response); caption a caption (or text); mixed either."""

    def has_qa(f: dict[str, Any]) -> bool:
        return _text(f, "question") and (_text(f, "response") or _text(f, "answer"))

    def has_caption(f: dict[str, Any]) -> bool:
        return _text(f, "caption") or _text(f, "text")

    def check(fields: dict[str, Any]) -> str | None:
        if objective == "qa":
            if not _text(fields, "question"):
                return "missing_question"
            return None if has_qa(fields) else "missing_answer"
        if objective == "caption":
            return None if has_caption(fields) else "missing_caption"
        return None if has_qa(fields) or has_caption(fields) else "missing_caption_and_qa"

    return check


def encode_targets(task: Any, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) and labels (B, T) of a batch: each row is `task.prompt_tokens(prompt)` + target +
    `<|eot_id|>` (`task.target_text(sample, row)`), the loss on the target only, padded with pad_id."""
    rows, label_rows = [], []
    for row, s in enumerate(samples):
        prompt, target = task.target_text(s, row)
        head = task.prompt_tokens(prompt)
        tail = [*task.tokenizer.encode(target), task.eot_id]
        seq = head + tail
        rows.append(seq[:-1])
        label_rows.append([IGNORE_INDEX] * (len(head) - 1) + tail)  # predict the target tokens only
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), task.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        tokens[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
    return tokens, labels


def batches_of(data: Iterable[dict[str, Any]], batch_size: int, encode) -> Iterator[dict[str, Any]]:
    """Encoded batches of `batch_size` samples; the last, ragged batch counts too (validation)."""
    batch: list[dict[str, Any]] = []
    for sample in data:
        batch.append(sample)
        if len(batch) == batch_size:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)


class VisionTask(TaskBase):
    """Image adapter training (`herd train vision`). Config sections: `[vision]` (the frozen LLM, the
    encoder, the objective and the data) and `[data]` (batch size, seed)."""

    name = "vision"
    layouts = frozenset({"fsdp", "hsdp", "tp", "pp"})
    plan = MULTIMODAL_PLAN
    sections = ("vision", "data")

    def __init__(self, vision: VisionConfig, data: DataConfig, tokenizer: Any | None = None) -> None:
        v = vision
        if not v.llm:
            raise ValueError("vision.llm: the frozen LLM checkpoint to build on is required")
        if v.caption_every < 1:
            raise ValueError(f"vision.caption_every must be ≥ 1, got {v.caption_every}")
        if not (v.train_manifest or v.shards):
            raise ValueError("vision.train_manifest or vision.shards is required")
        self.vision, self.data = vision, data
        self.llm_args, self._llm_state = load_checkpoint(v.llm)
        if tokenizer is None:
            from herd.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(v.llm, vocab_size=self.llm_args.vocab_size)
        self.tokenizer = tokenizer
        self.model_args = self.llm_args  # for the runtime's init-mode choice and checkpoint metadata
        self.vision_args = get_vision_preset(v.encoder, **{"max_num_tiles": v.max_tiles, **v.encoder_args})
        self.cross_attention_layers = fusion_schedule(self.llm_args.n_layers, v.cross_attention_every)
        self.transform = ImageTransform(tile_size=self.vision_args.image_size, max_tiles=v.max_tiles)
        # Mllama's convention: `<|image|>` is id vocab_size, the first of the adapter's trainable
        # image-token embeddings (128256 for Llama 3); the frozen LLM's own rows are never used for it
        self.image_id = self.llm_args.vocab_size
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_id
        self.check_record = missing_fields(v.objective)
        self._skipped: dict[str, SkipCounter] = {}

    def check_layout(self, degrees: dict[str, int]) -> None:
        super().check_layout(degrees)
        if degrees.get("pp", 1) > 1 and degrees.get("tp", 1) > 1:
            raise LayoutNotSupported(
                "herd train vision runs pipeline parallelism with FSDP/HSDP, not together with tensor "
                "parallelism (the image adapter's sequence-parallel hooks wrap the whole model)"
            )

    # --- model ----------------------------------------------------------------------------------------
    def _new_model(self) -> MultimodalLlama:
        return MultimodalLlama(
            Llama(self.llm_args),
            VisionEncoder(self.vision_args),
            cross_attention_layers=self.cross_attention_layers,
        )

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return self._new_model()

    def init_weights(self, model: nn.Module) -> None:
        """Encoder and adapter as their constructors initialise them (seeded); the LLM from its
        checkpoint; optionally the encoder trunk from an open_clip/timm checkpoint. A pipeline stage
        takes its share of the same whole model, so its encoder copy equals every other stage's."""
        reference = self._new_model()
        if self.vision.encoder_weights:
            load_vision_weights(reference.vision, self.vision.encoder_weights)
        state = reference.state_dict()
        state.update({f"llm.{k}": v for k, v in self._llm_state.items()})
        own = model.state_dict().keys()
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        model.freeze_llm()

    # --- data -----------------------------------------------------------------------------------------
    def target_text(self, sample: dict[str, Any], row: int = 0) -> tuple[str, str]:
        """(prompt, target) of a sample; with the "mixed" objective every `caption_every`-th row of a
        batch is a caption (the record's question otherwise, or its caption when it has no question)."""
        objective = self.vision.objective
        if objective == "mixed":
            caption_row = row % self.vision.caption_every == 0
            has_caption = bool(sample.get("caption") or sample.get("text"))
            has_qa = bool(sample.get("question"))
            objective = "caption" if (caption_row and has_caption) or not has_qa else "qa"
        if objective == "caption":
            return "", str(sample.get("caption") or sample["text"])
        return qa_prompt(sample["question"]), f" {sample.get('response') or sample['answer']}"

    def prompt_tokens(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, self.image_id, *self.tokenizer.encode(prompt)]

    def encode(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens, labels = encode_targets(self, samples)
        T = tokens.shape[1]
        images = collate_images([self.transform(s["image"]) for s in samples], max_images_per_sample=1)
        # every text token may look at every real tile of its image: (B, T, 1, tiles)
        xmask = images["aspect_ratio_mask"][:, None].expand(-1, T, -1, -1).clone()
        return {"tokens": tokens, "labels": labels, "pixel_values": images["pixel_values"],
                "aspect_ratio_ids": images["aspect_ratio_ids"], "aspect_ratio_mask": images["aspect_ratio_mask"],
                "cross_attention_mask": xmask}  # fmt: skip

    def dataset(self, split: str, rank: int = 0, world_size: int = 1, loop: bool = True) -> ImageTextDataset:
        v = self.vision
        kw = {"rank": rank, "world_size": world_size, "seed": self.data.seed, "loop": loop, "shuffle": loop,
              "check": self.check_record}  # fmt: skip
        if split == "val":
            data = ImageTextDataset.from_jsonl(v.val_manifest, **kw)
        elif v.shards:
            data = ImageTextDataset.from_tar_shards(v.shards, **kw)
        else:
            data = ImageTextDataset.from_jsonl(v.train_manifest, **kw)
        self._skipped[split] = data.skipped
        return data

    def skip_counts(self) -> dict[str, SkipCounter]:
        return dict(self._skipped)

    def train_batches(self, rank: int, world_size: int) -> ResumableBatches:
        self.train_data = self.dataset("train", rank, world_size)
        return ResumableBatches(self.train_data, self.data.batch_size // world_size, self.encode)

    def val_batches(self):
        if not self.vision.val_manifest:
            return None
        return batches_of(self.dataset("val", loop=False), self.data.batch_size, self.encode)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        return (batch["tokens"],), {k: batch[k] for k in keys}

    def loss_from_output(self, logits: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        loss_sum, n = causal_lm_loss(logits, batch["labels"])  # logits (B, T, V)
        return LossOutput(loss_sum, n)

    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """The adapter (encoder, projector, cross-attention, image-token embeddings) in herd's image-adapter
        layout, which `herd ask` loads; the frozen LLM is referenced by path, not copied. Any
        `checkpoint.export_format` but "none" writes it (the LLM keeps its own format)."""
        if fmt == "none":
            return None
        return save_multimodal_state(
            state_dict,
            self.vision_args,
            self.cross_attention_layers,
            self.vision.llm,
            self.vision.max_tiles,
            out_dir,
        )


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
