"""Synthetic image QA for the CPU vision quickstart: coloured shapes, scored one-word answers, known chance.

Each example is a small image with 1–3 shapes and one question of a known type; `answer` is the
scored word, `response` the full answer trained on (colour and shape answers restate their object):
  color     "What color is the square?"                           → "red"  ("the square is red")
  shape     "What shape is the red object?"                       → "circle"  ("a red circle")
  count     "How many shapes are there?"                          → "two"
  position  "Is the red circle left or right of the blue square?" → "left"
plus a caption ("Two shapes, from left to right: a red circle and a blue square.") for caption
pretraining. The vocabulary is `herd.data.synthetic.text`'s, so a text model trained on that corpus
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

from herd.data.records import atomic_write_json, read_jsonl, write_jsonl
from herd.data.synthetic.text import COLORS, NUMBER_WORDS, SHAPES, restated_answer, scene_caption

QUESTION_TYPES = ("color", "shape", "count", "position")
SPLITS = {"train": 0, "val": 1}  # split name → stream id in the seed
BACKGROUND = (245, 245, 240)
# A shape's side as a fraction of the image (10–13 px at 56 px: about two 7-px patches a side). Larger
# shapes (0.20–0.27, the most three side by side allow) did not help the quickstart: measured.
SIZE_RANGE = (0.17, 0.24)
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
    answer: str  # one word: what is scored, and what chance is computed over
    response: str  # the full answer trained on: `restated_answer` ("the square is red")
    caption: str

    def render(self) -> Image.Image:
        return render_scene(self.scene, self.image_size)

    def record(self, image: str) -> dict[str, Any]:
        """The manifest row `herd.data.training.image_text` reads; `scene` keeps the ground truth for checks."""
        return {
            "image": image,
            "caption": self.caption,
            "question": self.question,
            "answer": self.answer,
            "response": self.response,
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
    size = float(rng.uniform(*SIZE_RANGE) * image_size)
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
    return scene_caption([(s.color, s.shape) for s in sorted(scene, key=lambda s: s.cx)])


def question_cycle(mix: dict[str, int] | None = None) -> tuple[str, ...]:
    """Question types in the order examples cycle through them; `mix` gives each type's share, e.g.
    {"color": 4, "shape": 2, "count": 1, "position": 1}. Default: each type once."""
    if mix is None:
        return QUESTION_TYPES
    if unknown := set(mix) - set(QUESTION_TYPES):
        raise ValueError(f"question mix: unknown question types {sorted(unknown)}; known: {QUESTION_TYPES}")
    if any(not isinstance(k, int) or k < 0 for k in mix.values()) or not any(mix.values()):
        raise ValueError(f"question mix: shares must be whole numbers ≥ 0, not all 0; got {mix}")
    # interleave rather than group, so every window of examples has every type in its share
    # (slot i of a type's k sits at (i + ½)/k of the cycle; ties keep QUESTION_TYPES order)
    slots = sorted(((i + 0.5) / k, QUESTION_TYPES.index(q)) for q, k in mix.items() for i in range(k))
    return tuple(QUESTION_TYPES[t] for _, t in slots)


def make_example(
    seed: int, split: str, index: int, image_size: int = 64, cycle: tuple[str, ...] = QUESTION_TYPES
) -> ShapesExample:
    """Example `index` of `split`; a pure function of its arguments. Its question type is
    `cycle[index % len(cycle)]` (`question_cycle`)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = cycle[index % len(cycle)]
    # Position questions need two shapes; everything else sees 1-3 (uniform, so count chance is 1/3).
    n = int(rng.integers(2, 4)) if qtype == "position" else int(rng.integers(1, 4))
    scene = _scene(rng, n, image_size, unique_shape=qtype == "color")
    if qtype in ("color", "shape"):
        if qtype == "color":
            counts = Counter(s.shape for s in scene)
            target = scene[int(rng.choice([i for i, s in enumerate(scene) if counts[s.shape] == 1]))]
            question, answer = f"What color is the {target.shape}?", target.color
        else:
            target = scene[int(rng.integers(n))]
            question, answer = f"What shape is the {target.color} object?", target.shape
        response = restated_answer(qtype, target.color, target.shape, answer)
        return ShapesExample(scene, image_size, qtype, question, answer, response, caption_of(scene))
    if qtype == "count":
        question, answer = "How many shapes are there?", NUMBER_WORDS[n]
    else:
        a, b = (scene[int(i)] for i in rng.choice(n, size=2, replace=False))
        question = f"Is the {a.name} left or right of the {b.name}?"
        answer = "left" if a.cx < b.cx else "right"
    return ShapesExample(scene, image_size, qtype, question, answer, answer, caption_of(scene))


def generate_split(
    n: int, seed: int = 0, split: str = "train", image_size: int = 64, mix: dict[str, int] | None = None
) -> Iterator[ShapesExample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    cycle = question_cycle(mix)
    for i in range(n):
        yield make_example(seed, split, i, image_size, cycle)


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
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    image_size: int = 64,
    train_mix: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write `train.jsonl`, `val.jsonl`, `images/{split}/{i:06d}.png` and `info.json` under `out_dir`.

    Image paths in the manifests are relative to `out_dir`, the manifest's folder, which is what
    `herd.data.training.image_text.JsonlImageText` expects. `train_mix` weights the training split's question
    types (`question_cycle`); the held-out split always has every type equally often.
    Returns the info (counts, chance per split).
    """
    out = Path(out_dir)
    info: dict[str, Any] = {"seed": seed, "image_size": image_size, "train_mix": train_mix, "splits": {}}
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        mix = train_mix if split == "train" else None
        for i, ex in enumerate(generate_split(n, seed, split, image_size, mix)):
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
