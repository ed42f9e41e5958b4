"""Synthetic image QA for the CPU vision quickstart: coloured shapes, one-word answers, known chance.

Each example is a small image with 1–3 shapes and one question of a known type:
  color     "What color is the square?"                              → "red"
  shape     "What shape is the red object?"                          → "circle"
  count     "How many shapes are there?"                             → "two"
  position  "Is the red circle left or right of the blue square?"    → "left"
plus a caption ("Two shapes, from left to right: a red circle and a blue square.") for caption
pretraining. The vocabulary is `herd.data.synthetic_text`'s, so a text model trained on that corpus
already knows every word an answer needs; only the image tells it *which* word.

Questions are unambiguous by construction: the colours in one scene are distinct (so "the red object"
is one shape), a colour question names a shape that occurs once, and shapes are spread horizontally
so "left of" never depends on a pixel. Question types cycle color/shape/count/position, so every split
is balanced. Example i of a split is drawn from its own generator seeded by (seed, split, i): the
first n examples do not depend on how many are generated, and train/val never share a random stream.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from herd.data.jsonl_io import atomic_write_json, read_jsonl, write_jsonl
from herd.data.synthetic_text import COLORS, NUMBER_WORDS, SHAPES

QUESTION_TYPES = ("color", "shape", "count", "position")
SPLITS = {"train": 0, "val": 1}  # split name → stream id in the seed
BACKGROUND = (245, 245, 240)
RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
}
assert set(RGB) == set(COLORS), "every colour word needs a paint"


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top
    size: float  # side of the bounding square, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class ShapesExample:
    scene: tuple[ShapeSpec, ...]
    image_size: int
    question_type: str
    question: str
    answer: str
    caption: str

    def render(self) -> Image.Image:
        return render_scene(self.scene, self.image_size)

    def record(self, image: str) -> dict[str, Any]:
        """The manifest row `herd.data.image_text` reads; `scene` keeps the ground truth for checks."""
        return {
            "image": image,
            "caption": self.caption,
            "question": self.question,
            "answer": self.answer,
            "question_type": self.question_type,
            "scene": [asdict(s) for s in self.scene],
        }


def render_scene(scene: Iterable[ShapeSpec], image_size: int) -> Image.Image:
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for s in scene:
        r = s.size / 2
        box = (s.cx - r, s.cy - r, s.cx + r, s.cy + r)
        if s.shape == "circle":
            draw.ellipse(box, fill=RGB[s.color])
        elif s.shape == "square":
            draw.rectangle(box, fill=RGB[s.color])
        else:  # triangle, apex up
            draw.polygon([(s.cx, s.cy - r), (s.cx + r, s.cy + r), (s.cx - r, s.cy + r)], fill=RGB[s.color])
    return im


def _place(rng: np.random.Generator, n: int, image_size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, size) of n shapes whose horizontal extents never overlap, so none hides another and
    left/right is unambiguous. Sorted centres get a gap of one shape size plus a margin between them:
    sample n points in the slack, sort, and add i·gap (uniform over valid layouts, no rejection loop)."""
    size = float(rng.uniform(0.17, 0.24) * image_size)
    margin = max(1.0, 0.04 * image_size)
    gap = size + margin
    lo, hi = size / 2 + 1, image_size - size / 2 - 1
    slack = (hi - lo) - (n - 1) * gap
    if slack < 0:
        raise ValueError(f"image_size {image_size} is too small for {n} shapes")
    xs = np.sort(rng.uniform(0, slack, n)) + lo + gap * np.arange(n)
    ys = rng.uniform(lo, hi, n)
    order = rng.permutation(n)  # which shape gets which slot is independent of left-to-right order
    return [(float(xs[i]), float(ys[i]), size) for i in order]


def _scene(rng: np.random.Generator, n: int, image_size: int, unique_shape: bool) -> tuple[ShapeSpec, ...]:
    colors = rng.choice(len(COLORS), size=n, replace=False)
    while True:
        shapes = rng.integers(0, len(SHAPES), size=n)
        # A colour question needs a shape that appears exactly once; redraw the (cheap) shape list.
        if not unique_shape or 1 in Counter(shapes.tolist()).values():
            break
    return tuple(
        ShapeSpec(COLORS[c], SHAPES[s], cx, cy, size)
        for c, s, (cx, cy, size) in zip(colors, shapes, _place(rng, n, image_size))
    )


def caption_of(scene: tuple[ShapeSpec, ...]) -> str:
    names = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.name}" for s in sorted(scene, key=lambda s: s.cx)]
    count = NUMBER_WORDS[len(scene)].capitalize()
    if len(names) == 1:
        return f"{count} shape: {names[0]}."
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{count} shapes, from left to right: {listed}."


def make_example(seed: int, split: str, index: int, image_size: int = 64) -> ShapesExample:
    """Example `index` of `split`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    # Position questions need two shapes; everything else sees 1-3 (uniform, so count chance is 1/3).
    n = int(rng.integers(2, 4)) if qtype == "position" else int(rng.integers(1, 4))
    scene = _scene(rng, n, image_size, unique_shape=qtype == "color")
    if qtype == "color":
        counts = Counter(s.shape for s in scene)
        target = scene[int(rng.choice([i for i, s in enumerate(scene) if counts[s.shape] == 1]))]
        question, answer = f"What color is the {target.shape}?", target.color
    elif qtype == "shape":
        target = scene[int(rng.integers(n))]
        question, answer = f"What shape is the {target.color} object?", target.shape
    elif qtype == "count":
        question, answer = "How many shapes are there?", NUMBER_WORDS[n]
    else:
        a, b = (scene[int(i)] for i in rng.choice(n, size=2, replace=False))
        question = f"Is the {a.name} left or right of the {b.name}?"
        answer = "left" if a.cx < b.cx else "right"
    return ShapesExample(scene, image_size, qtype, question, answer, caption_of(scene))


def generate_split(
    n: int, seed: int = 0, split: str = "train", image_size: int = 64
) -> Iterator[ShapesExample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    for i in range(n):
        yield make_example(seed, split, i, image_size)


def chance_accuracy(split: str | Path | Iterable[dict[str, Any] | ShapesExample]) -> dict[str, float]:
    """Per question type, the accuracy of always giving that type's most common answer.

    This is the ceiling of an image-blind model: within a type the answer is independent of the
    question's wording (colours, shapes and positions are drawn independently), so knowing the
    question but not the image cannot beat the majority answer. `split` is a manifest path or rows.
    """
    rows = read_jsonl(split) if isinstance(split, str | Path) else split
    answers: dict[str, Counter[str]] = {}
    for r in rows:
        qtype, answer = (
            (r.question_type, r.answer) if isinstance(r, ShapesExample) else (r["question_type"], r["answer"])
        )
        answers.setdefault(qtype, Counter())[answer] += 1
    return {q: c.most_common(1)[0][1] / c.total() for q, c in sorted(answers.items())}


def write_shapes_dataset(
    out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, image_size: int = 64
) -> dict[str, Any]:
    """Write `train.jsonl`, `val.jsonl`, `images/{split}/{i:06d}.png` and `info.json` under `out_dir`.

    Image paths in the manifests are relative to `out_dir`, the manifest's folder, which is what
    `herd.data.image_text.JsonlImageText` expects. Returns the info (counts, chance per split).
    """
    out = Path(out_dir)
    info: dict[str, Any] = {"seed": seed, "image_size": image_size, "splits": {}}
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, ex in enumerate(generate_split(n, seed, split, image_size)):
            rel = f"images/{split}/{i:06d}.png"
            ex.render().save(out / rel)
            rows.append(ex.record(rel))
        write_jsonl(out / f"{split}.jsonl", rows)  # after the images: an existing manifest is complete
        info["splits"][split] = {
            "n": n,
            "manifest": f"{split}.jsonl",
            "question_types": dict(Counter(r["question_type"] for r in rows)),
            "chance_accuracy": chance_accuracy(rows),
        }
    atomic_write_json(out / "info.json", info)
    return info
