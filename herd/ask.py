"""Image question answering with a trained vision adapter: `herd ask` and its Python API.

A vision checkpoint is a folder with `vision.json` (encoder args, cross-attention schedule, tiling,
the frozen LLM's path) and `adapter.safetensors` (encoder, projector, cross-attention layers — the
frozen LLM is not copied; it is loaded from its own checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from herd.adapters.multimodal import MultimodalLlama, generate_with_images
from herd.tasks.vision import qa_prompt
from herd.text.generation import SamplingParams
from herd.text.loading import load_pretrained
from herd.vision.encoder import VisionEncoder
from herd.vision.tiling import ImageTransform, collate_images
from herd.vision.vision_args import VisionArgs

CONFIG_FILE, WEIGHTS_FILE = "vision.json", "adapter.safetensors"


def save_vision_model(
    model: MultimodalLlama, llm_path: str | Path, max_tiles: int, out_dir: str | Path
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {
        "llm": str(Path(llm_path).resolve()),
        "vision_args": dataclasses.asdict(model.vision.args),
        "cross_attention_layers": list(model.cross_attention_layers),
        "max_tiles": max_tiles,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


class VisionQA:
    """Answers questions about images with a frozen LLM + trained vision adapter."""

    def __init__(self, model: MultimodalLlama, tokenizer: Any, max_tiles: int) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.transform = ImageTransform(tile_size=model.vision.args.image_size, max_tiles=max_tiles)
        self.image_id = model.args.vocab_size  # Mllama's `<|image|>` convention (see herd.tasks.vision)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> VisionQA:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a vision checkpoint (no {CONFIG_FILE}); train one with "
                                    "`herd train vision` or `herd quickstart`")  # fmt: skip
        config = json.loads((path / CONFIG_FILE).read_text())
        llm, tokenizer = load_pretrained(config["llm"], device=device)
        args = config["vision_args"]
        args["aspect_ratios"] = [tuple(r) for r in args["aspect_ratios"]]
        model = MultimodalLlama(
            llm, VisionEncoder(VisionArgs(**args)), cross_attention_layers=config["cross_attention_layers"]
        )
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
        bad_missing = [k for k in missing if not k.startswith("llm.")]
        if bad_missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
        return cls(model.to(device), tokenizer, config["max_tiles"])

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
        )  # fmt: skip
        return [tok.decode(c.tokens).strip() for c in done]
