"""Tiling parity with transformers' MllamaImageProcessor: canvas, ids, masks exactly; pixels within 1 level.

Two reference processors: `MllamaImageProcessorPil` resizes with PIL like we do, so pixels must match
to float rounding (measured: 0.0); `MllamaImageProcessor` resizes with torchvision's antialiased kernel,
which rounds some pixels one 8-bit level differently (measured max |diff| 0.0150 = 1/255/0.2613, the
smallest CLIP std).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from herd.vision import supported_aspect_ratios
from herd.vision.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    aspect_ratio_id,
    best_canvas,
    collate_images,
    fit_to_canvas,
)

mllama = pytest.importorskip("transformers.models.mllama.image_processing_mllama")
mllama_pil = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")

# (width, height): tiny, exactly one tile, just over a tile, wide, tall, 1×N, extreme ratios, huge.
SIZES = [
    (1, 1),
    (1, 500),
    (500, 1),
    (10, 10),
    (56, 56),
    (57, 56),
    (113, 57),
    (112, 56),
    (56, 112),
    (200, 30),
    (30, 200),
    (1000, 3),
    (3, 1000),
    (300, 300),
    (640, 480),
    (480, 640),
    (2000, 100),
    (100, 2000),
    (60, 250),
    (2500, 1700),
]
ONE_LEVEL = 1 / 255 / min(CLIP_STD)  # one 8-bit step after normalisation ≈ 0.0150


def random_image(width: int, height: int, seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def processors(tile: int, max_tiles: int) -> list[tuple[str, object]]:
    kw = dict(
        size={"height": tile, "width": tile},
        max_image_tiles=max_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return [
        ("pil", mllama_pil.MllamaImageProcessorPil(**kw)),
        ("torchvision", mllama.MllamaImageProcessor(**kw)),
    ]


def test_supported_aspect_ratios_match_mllama() -> None:
    for k in (1, 2, 4, 6, 9):
        assert list(supported_aspect_ratios(k)) == mllama.get_all_supported_aspect_ratios(k)
    assert [aspect_ratio_id(rows, cols, 4) for rows, cols in [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)]] == [
        1,
        4,
        5,
        6,
        8,
    ]


def test_canvas_and_fit_rules_match_mllama_on_a_dense_grid() -> None:
    # Small tiles make every tie and boundary reachable with small sizes: 1..60 px × 1..60 px covers
    # images below one tile, exactly on tile multiples, and every aspect ratio up to 60:1.
    mismatches = []
    for tile, k in ((7, 4), (5, 6)):
        for h, w in itertools.product(range(1, 61), repeat=2):
            ours = best_canvas(h, w, tile, k)
            ref = tuple(int(v) for v in mllama.get_optimal_tiled_canvas(h, w, k, tile))
            if ours != ref:
                mismatches.append(("canvas", tile, k, h, w, ours, ref))
                continue
            fit = fit_to_canvas(h, w, *ours, tile)
            ref_fit = tuple(int(v) for v in mllama.get_image_size_fit_to_canvas(h, w, *ref, tile))
            if fit != ref_fit:
                mismatches.append(("fit", tile, k, h, w, fit, ref_fit))
    assert not mismatches, mismatches[:5]


def test_canvas_examples_from_the_paper() -> None:
    # 336-px tiles, at most 4: a square photo → 672×672, a 2:1 panorama → 336×672, a 4:1 strip → 336×1344.
    assert best_canvas(1000, 1000, 336, 4) == (672, 672)
    assert best_canvas(500, 1000, 336, 4) == (336, 672)
    assert best_canvas(300, 1200, 336, 4) == (336, 1344)
    assert best_canvas(100, 100, 336, 4) == (336, 336)  # small images are not spread over tiles


@pytest.mark.parametrize("max_tiles", [4, 6])
def test_single_images_match_mllama(max_tiles: int) -> None:
    tile = 56
    transform = ImageTransform(tile_size=tile, max_tiles=max_tiles)
    worst = {"pil": 0.0, "torchvision": 0.0}
    for i, (w, h) in enumerate(SIZES):
        im = random_image(w, h, seed=i)
        ours = transform(im)
        assert ours.pixel_values.shape == (max_tiles, 3, tile, tile)
        assert torch.all(ours.pixel_values[ours.num_tiles :] == 0)
        # The torchvision processor is slow on CPU; one tile budget is enough to bound its pixel diff.
        for name, proc in processors(tile, max_tiles)[: 2 if max_tiles == 4 else 1]:
            ref = proc(images=[[im]], return_tensors="pt")
            where = f"{w}x{h} vs {name}"
            assert ref["num_tiles"] == [[ours.num_tiles]], where
            assert ref["aspect_ratio_ids"].tolist() == [[ours.aspect_ratio_id]], where
            assert torch.equal(ref["aspect_ratio_mask"][0, 0], ours.aspect_ratio_mask), where
            diff = (ref["pixel_values"][0, 0] - ours.pixel_values).abs().max().item()
            worst[name] = max(worst[name], diff)
    assert worst["pil"] <= 1e-6, f"same PIL resample: max |diff| {worst['pil']:.3g}"
    if max_tiles == 4:  # torchvision's antialiased resize rounds some pixels one 8-bit level apart
        assert worst["torchvision"] <= ONE_LEVEL + 1e-5, f"max |diff| {worst['torchvision']:.4f}"


def test_default_tile_sizes_match_mllama() -> None:
    # The paper's 336 and the released Mllama's 560 on a photo-sized and a strip-sized image.
    for tile in (336, 560):
        transform = ImageTransform(tile_size=tile)
        (_, proc), _ = processors(tile, 4)
        for i, (w, h) in enumerate([(1280, 960), (90, 700)]):
            im = random_image(w, h, seed=100 + i)
            ours, ref = transform(im), proc(images=[[im]], return_tensors="pt")
            assert ref["aspect_ratio_ids"].item() == ours.aspect_ratio_id
            assert (ref["pixel_values"][0, 0] - ours.pixel_values).abs().max().item() <= 1e-6


def test_transparency_mode_and_resample_options() -> None:
    tile = 28
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent → white, as in Mllama
    gray = Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30), "L")
    for im in (rgba, gray):
        ours = ImageTransform(tile_size=tile)(im)
        ref = processors(tile, 4)[0][1](images=[[im]], return_tensors="pt")
        assert (ref["pixel_values"][0, 0] - ours.pixel_values).abs().max().item() <= 1e-6
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(ImageTransform(tile_size=tile)(rgba).pixel_values[0, :, 0, 0], white)

    im = random_image(50, 90, seed=7)
    bicubic = ImageTransform(tile_size=tile, resample=Image.Resampling.BICUBIC)(im)
    ref = processors(tile, 4)[0][1](images=[[im]], resample=Image.Resampling.BICUBIC, return_tensors="pt")
    assert (ref["pixel_values"][0, 0] - bicubic.pixel_values).abs().max().item() <= 1e-6


def test_padding_and_tile_order() -> None:
    # A 2×1 canvas of a constant image: padded strip holds normalised black, tiles read row-major.
    tile = 16
    top, bottom = np.full((16, 10, 3), 200, np.uint8), np.full((16, 10, 3), 50, np.uint8)
    im = Image.fromarray(np.concatenate([top, bottom]), "RGB")  # 10 wide, 32 tall → 2 rows × 1 col
    out = ImageTransform(tile_size=tile, mean=(0, 0, 0), std=(1, 1, 1), resample=Image.Resampling.NEAREST)(im)
    assert (out.rows, out.cols, out.resized_size) == (2, 1, (32, 10))
    assert out.aspect_ratio_mask.tolist() == [1, 1, 0, 0]
    assert torch.allclose(out.pixel_values[0, :, :, :10], torch.full((3, 16, 10), 200 / 255))
    assert torch.allclose(out.pixel_values[1, :, :, :10], torch.full((3, 16, 10), 50 / 255))
    assert torch.all(out.pixel_values[:2, :, :, 10:] == 0)  # right padding


def test_collate_matches_mllama_batches() -> None:
    tile, k = 28, 4
    transform = ImageTransform(tile_size=tile, max_tiles=k)
    batch = [
        [random_image(90, 40, 1), random_image(20, 100, 2)],
        [random_image(33, 33, 3)],
        [],
    ]
    ref = processors(tile, k)[0][1](images=batch[:2], return_tensors="pt")
    out = collate_images([[transform(im) for im in images] for images in batch[:2]])
    assert out["pixel_values"].shape == (2, 2, k, 3, tile, tile)
    assert torch.equal(out["aspect_ratio_ids"], ref["aspect_ratio_ids"])
    assert torch.equal(out["aspect_ratio_mask"], ref["aspect_ratio_mask"])
    assert out["num_tiles"].tolist() == [ref["num_tiles"][0], [ref["num_tiles"][1][0], 0]]
    assert (out["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-6

    # A fixed N pads further; a sample without images is all padding (id 0, first tile unmasked).
    fixed = collate_images([[transform(im) for im in images] for images in batch], max_images_per_sample=3)
    assert fixed["pixel_values"].shape == (3, 3, k, 3, tile, tile)
    assert fixed["aspect_ratio_ids"][2].tolist() == [0, 0, 0]
    assert fixed["aspect_ratio_mask"][2].tolist() == [[1, 0, 0, 0]] * 3
    assert torch.all(fixed["pixel_values"][2] == 0)
    # One TiledImage per sample is accepted as is.
    single = collate_images([transform(batch[1][0])])
    assert single["pixel_values"].shape == (1, 1, k, 3, tile, tile)
    with pytest.raises(ValueError, match="max_images_per_sample"):
        collate_images([[transform(im) for im in batch[0]]], max_images_per_sample=1)
