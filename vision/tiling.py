"""Image tiling for the vision adapter (paper §7.1; the rule Llama 3.2 Vision / Mllama ships).

An image is resized onto a *canvas* of `rows × cols` square tiles (`rows · cols ≤ max_tiles`), padded
with black to the canvas, split into tiles in row-major order and normalised; the encoder then sees up to
`max_tiles` tiles of `tile_size²` pixels. The paper uses 336-px tiles (ViT-H/14 at 336 px) and raises the
per-tile resolution when annealing; the released Mllama uses 560. Both are just `tile_size`.

Canvas choice (what keeps the most resolution with the least distortion):
  * every arrangement gives a scale `min(canvas_h / h, canvas_w / w)`, the largest factor by which the
    image fits that canvas without changing its aspect ratio;
  * if some canvas needs no downscaling (scale ≥ 1), take the one that upscales *least* (no canvas
    bigger than needed, so a small image spends few tiles); otherwise take the one that downscales
    least (keeps the most pixels of a big image);
  * ties go to the smaller canvas area, then to the earlier arrangement.
Only the scale counts, not the padding: with 56-px tiles a 113×57 image shrinks by 0.991 onto 2×2 and
by 0.982 onto 1×2, so it takes four tiles, half of them padding. Mllama does the same, and we keep it.
The image is then resized to fit the canvas with its aspect ratio kept (never below one tile per side),
and only the bottom/right is padded. These rules, the aspect-ratio ids and the masks reproduce
transformers' `MllamaImageProcessor` exactly (tests/vision/test_tiling.py), so checkpoints converted
from Mllama see the inputs they were trained on.

Shapes: T = tile_size, K = max_tiles, B = batch, N = images per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from herd.vision.vision_args import supported_aspect_ratios

# OpenAI CLIP's statistics: MetaCLIP (the paper's encoder) and Llama 3.2 Vision both normalise with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def aspect_ratio_id(rows: int, cols: int, max_tiles: int) -> int:
    """1-based id of a tile arrangement (0 is reserved for padding images in a batch).

    The id is the arrangement's index in `supported_aspect_ratios` (+1), whose order the aspect-ratio
    embeddings of a converted Mllama checkpoint are indexed by. Mllama's canvas code reads each pair as
    (tiles down, tiles across), so (2, 1) is a tall two-tile canvas; for 4 tiles the order is
    (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1).
    """
    return supported_aspect_ratios(max_tiles).index((rows, cols)) + 1


def best_canvas(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """(canvas_height, canvas_width) in pixels for an image of `height × width` (rule in the module doc)."""
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1×1 pixels, got {width}×{height}")
    # Python floats are IEEE doubles like numpy's float64, so the equality used to find ties below
    # behaves exactly as in the reference implementation.
    options = [
        (min(rows * tile_size / height, cols * tile_size / width), rows, cols)
        for rows, cols in supported_aspect_ratios(max_tiles)
    ]
    upscales = [s for s, _, _ in options if s >= 1]
    chosen = min(upscales) if upscales else max(s for s, _, _ in options)
    # min() returns the first of equal keys: smaller area first, then arrangement order.
    _, rows, cols = min((o for o in options if o[0] == chosen), key=lambda o: o[1] * o[2])
    return rows * tile_size, cols * tile_size


def fit_to_canvas(
    height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """(new_height, new_width): the image scaled to fit the canvas with its aspect ratio kept.

    The target side lengths are first clamped to [tile_size, canvas]: an image smaller than one tile
    is upscaled to fill at least a tile (the encoder gains nothing from a mostly-black tile), one
    larger than the canvas is shrunk. The binding side takes its target; the other is scaled and
    floored (at least 1 px, so a 1×N image stays valid).
    """
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (a transparent logo on black would vanish)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class TiledImage:
    """One image after `ImageTransform`; `collate_images` stacks these into Mllama-shaped batches."""

    pixel_values: torch.Tensor  # (K, 3, T, T) float32; tiles ≥ num_tiles are zeros
    rows: int  # tiles down the canvas
    cols: int  # tiles across the canvas
    aspect_ratio_id: int  # 1-based index into supported_aspect_ratios(K)
    aspect_ratio_mask: torch.Tensor  # (K,) int64; 1 for real tiles
    resized_size: tuple[int, int]  # (height, width) of the image on its canvas, before padding

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols


class ImageTransform:
    """PIL image → `TiledImage`: pick canvas, resize, pad, normalise, split into tiles.

    `resample` is a PIL filter (Mllama's preprocessor uses bilinear; PIL's bilinear antialiases when
    downscaling, so large photos do not alias). Padding happens *before* normalisation, as in the
    reference code, so the padded strip of a real tile holds (0 - mean) / std, not zero; only the
    missing tiles are exact zeros.
    """

    def __init__(
        self,
        tile_size: int = 336,
        max_tiles: int = 4,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: int = Image.Resampling.BILINEAR,
    ) -> None:
        if tile_size < 1:
            raise ValueError(f"tile_size must be ≥ 1, got {tile_size}")
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be ≥ 1, got {max_tiles}")
        self.tile_size, self.max_tiles, self.resample = tile_size, max_tiles, resample
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"ImageTransform(tile_size={self.tile_size}, max_tiles={self.max_tiles})"

    def __call__(self, image: Image.Image) -> TiledImage:
        T, K = self.tile_size, self.max_tiles
        image = to_rgb(image)
        width, height = image.size
        canvas_h, canvas_w = best_canvas(height, width, T, K)
        new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, T)
        rows, cols = canvas_h // T, canvas_w // T
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample)

        canvas = torch.zeros(3, canvas_h, canvas_w, dtype=torch.float32)  # black padding, bottom/right
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (new_h, new_w, 3)
        canvas[:, :new_h, :new_w] = pixels.permute(2, 0, 1).float() / 255.0
        canvas = (canvas - self.mean) / self.std

        # (3, rows·T, cols·T) → (rows·cols, 3, T, T), tiles in row-major order.
        tiles = canvas.view(3, rows, T, cols, T).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, T, T)
        pixel_values = torch.zeros(K, 3, T, T, dtype=torch.float32)
        pixel_values[: rows * cols] = tiles
        mask = torch.zeros(K, dtype=torch.long)
        mask[: rows * cols] = 1
        return TiledImage(
            pixel_values=pixel_values,
            rows=rows,
            cols=cols,
            aspect_ratio_id=aspect_ratio_id(rows, cols, K),
            aspect_ratio_mask=mask,
            resized_size=(new_h, new_w),
        )


def collate_images(
    samples: Sequence[TiledImage | Sequence[TiledImage]], max_images_per_sample: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack per-sample images into Mllama's vision inputs.

    `samples[b]` is one `TiledImage` or a list of them (several images in one sample, possibly none).
    `max_images_per_sample` fixes N so every batch has the same shape (steady memory, no recompiles);
    None uses the most images any sample in this batch has (at least 1). Returns
      pixel_values       (B, N, K, 3, T, T) float32, zeros for missing images and tiles
      aspect_ratio_ids   (B, N) int64, 0 for missing images
      aspect_ratio_mask  (B, N, K) int64
      num_tiles          (B, N) int64, 0 for missing images
    Missing images still get mask[..., 0] = 1, as in Mllama: the encoder runs on every slot (one fixed
    shape, and no rank skips it; see the FSDP note in STYLE.md), and a slot with *all* tiles masked
    would make its attention rows all -inf and its output NaN. The text side's cross-attention mask,
    not this one, is what hides padding images from the language model.
    """
    if not samples:
        raise ValueError("collate_images needs at least one sample")
    per_sample = [[s] if isinstance(s, TiledImage) else list(s) for s in samples]
    most = max(len(images) for images in per_sample)
    n_img = max(most, 1) if max_images_per_sample is None else max_images_per_sample
    if most > n_img:
        raise ValueError(f"a sample has {most} images, more than max_images_per_sample={n_img}")
    first = next((im for images in per_sample for im in images), None)
    if first is None:
        raise ValueError("collate_images needs at least one image to know the tile shape")
    K, C, T, _ = first.pixel_values.shape
    B = len(per_sample)

    pixel_values = torch.zeros(B, n_img, K, C, T, T, dtype=torch.float32)
    ids = torch.zeros(B, n_img, dtype=torch.long)
    mask = torch.zeros(B, n_img, K, dtype=torch.long)
    mask[:, :, 0] = 1
    num_tiles = torch.zeros(B, n_img, dtype=torch.long)
    for b, images in enumerate(per_sample):
        for i, im in enumerate(images):
            if im.pixel_values.shape != (K, C, T, T):
                raise ValueError(
                    f"image {i} of sample {b} has tiles {tuple(im.pixel_values.shape)}, expected {(K, C, T, T)}"
                )
            pixel_values[b, i] = im.pixel_values
            ids[b, i] = im.aspect_ratio_id
            mask[b, i] = im.aspect_ratio_mask
            num_tiles[b, i] = im.num_tiles
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ids,
        "aspect_ratio_mask": mask,
        "num_tiles": num_tiles,
    }
