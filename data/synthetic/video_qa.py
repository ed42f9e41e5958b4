"""Moving coloured shapes as real mp4 files, with questions a model can only answer by watching the
order of the frames: the video quickstart's data (`herd quickstart --modality video`).

The shapes, colours and 56-px canvas are the image quickstart's (`herd.data.synthetic.shapes`), so the
image model a video run starts from already sees them. Every clip has `CLIP_FRAMES` frames written with
PyAV (H.264, yuv420p) and is read back through `herd.vision.video.read_frames`, which samples the
model's `num_frames` uniformly over it. Three question types:

  direction  one shape travels 40 % of the canvas along one axis (a second one may stand still):
             "Is the red square going left or right?" / "… going above or below?" → "left" …
  order      two shapes; the first is on screen for the first ¾ of the clip, the second for the last ¾:
             "Which is there first, the red circle or the blue square?" → "red"
  shape      1–3 shapes standing still: "What shape is the red object?" → "a red circle" (static)

Why a frame-order-blind model stays at chance on direction and order (the shuffled-frames check of the
quickstart): a path's centre is drawn uniformly and it is travelled either way, so the *set* of frames is
the same for both answers; in an order clip both shapes are on screen in equally many frames. Each of
these questions names its two options, in random order: `chance_accuracy` is then the best a blind
guess does (50 %), and for `shape` the most common answer's share.

Words: the frozen quickstart LLM's vocabulary is trimmed to its corpus, so answers use its words
("above"/"below" for vertical motion, colour words for order); "going", "which", "first" are outside
it and reach the LLM as its unknown token, which is harmless: the wording of each type still differs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from herd.data.records import atomic_write_json, read_jsonl, write_jsonl
from herd.data.synthetic.shapes import SIZE_RANGE, ShapeSpec, _place, render_scene
from herd.data.synthetic.text import COLORS, SHAPES, restated_answer

VIDEO_QUESTION_TYPES = ("direction", "order", "shape")
SPLITS = {"train": 0, "val": 1}
CLIP_FRAMES = 16  # frames in each file (the model samples its num_frames of them)
FPS = 8
TRAVEL = 0.4  # a moving shape's path, as a fraction of the canvas
VISIBLE = 0.75  # the share of the clip each shape of an order question is on screen


@dataclass(frozen=True)
class VideoQAExample:
    frames: tuple[tuple[ShapeSpec, ...], ...]  # the scene of every frame
    image_size: int
    question_type: str
    question: str
    answer: str  # the scored word
    response: str  # the full answer trained on
    options: tuple[str, ...]  # the two answers a direction/order question names; () for shape

    def render(self) -> np.ndarray:
        """(CLIP_FRAMES, S, S, 3) uint8."""
        return np.stack([np.asarray(render_scene(scene, self.image_size)) for scene in self.frames])

    def record(self, video: str) -> dict[str, Any]:
        return {
            "video": video,
            "question": self.question,
            "answer": self.answer,
            "response": self.response,
            "question_type": self.question_type,
            "options": list(self.options),
        }


def _separate(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Two boxes (x0, y0, x1, y1) that do not touch."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _direction(rng: np.random.Generator, size: int, n_frames: int) -> VideoQAExample:
    side = float(rng.uniform(*SIZE_RANGE) * size)
    travel = TRAVEL * size
    lo, hi = side / 2 + 1, size - side / 2 - 1
    colors = rng.choice(len(COLORS), size=2, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=2)
    vertical, forward = bool(rng.integers(2)), bool(rng.integers(2))
    while True:  # the path's centre uniform (either way: the frame set is the same), a bystander apart
        c_move = float(rng.uniform(lo + travel / 2, hi - travel / 2))
        c_other = float(rng.uniform(lo, hi))
        still = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        a0, a1 = c_move - travel / 2, c_move + travel / 2
        path = (c_other, a0, c_other, a1) if vertical else (a0, c_other, a1, c_other)
        box = (path[0] - side, path[1] - side, path[2] + side, path[3] + side)
        if _separate(box, (still[0] - side, still[1] - side, still[0] + side, still[1] + side)):
            break
    with_bystander = bool(rng.integers(2))
    frames = []
    for k in range(n_frames):
        t = k / (n_frames - 1)
        along = a0 + (t if forward else 1 - t) * travel
        cx, cy = (c_other, along) if vertical else (along, c_other)
        scene = [ShapeSpec(COLORS[colors[0]], SHAPES[shapes[0]], cx, cy, side)]
        if with_bystander:
            scene.append(ShapeSpec(COLORS[colors[1]], SHAPES[shapes[1]], *still, side))
        frames.append(tuple(scene))
    name = f"{COLORS[colors[0]]} {SHAPES[shapes[0]]}"
    options = ("above", "below") if vertical else ("left", "right")
    answer = options[1] if forward else options[0]  # y grows downwards: forward is "below"
    question = f"Is the {name} going {options[0]} or {options[1]}?"
    return VideoQAExample(tuple(frames), size, "direction", question, answer, answer, options)


def _order(rng: np.random.Generator, size: int, n_frames: int) -> VideoQAExample:
    (x1, y1, side), (x2, y2, _) = _place(rng, 2, size)
    colors = rng.choice(len(COLORS), size=2, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=2)
    first = ShapeSpec(COLORS[colors[0]], SHAPES[shapes[0]], x1, y1, side)
    second = ShapeSpec(COLORS[colors[1]], SHAPES[shapes[1]], x2, y2, side)
    shown = math.ceil(VISIBLE * n_frames)  # each shape is on screen in `shown` frames: a symmetric set
    frames = tuple(
        tuple(s for s, on in ((first, k < shown), (second, k >= n_frames - shown)) if on)
        for k in range(n_frames)
    )
    named = (first, second) if rng.integers(2) else (second, first)
    question = f"Which is there first, the {named[0].name} or the {named[1].name}?"
    options = (named[0].color, named[1].color)
    return VideoQAExample(frames, size, "order", question, first.color, first.color, options)


def _shape(rng: np.random.Generator, size: int, n_frames: int) -> VideoQAExample:
    n = int(rng.integers(1, 4))
    colors = rng.choice(len(COLORS), size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    scene = tuple(
        ShapeSpec(COLORS[c], SHAPES[s], cx, cy, side)
        for c, s, (cx, cy, side) in zip(colors, shapes, _place(rng, n, size))
    )
    target = scene[int(rng.integers(n))]
    question = f"What shape is the {target.color} object?"
    response = restated_answer("shape", target.color, target.shape, target.shape)
    return VideoQAExample((scene,) * n_frames, size, "shape", question, target.shape, response, ())


MAKERS = {"direction": _direction, "order": _order, "shape": _shape}


def question_cycle(mix: dict[str, int] | None = None) -> tuple[str, ...]:
    """Question types in the order examples cycle through them; `mix` gives each type's share, e.g.
    {"direction": 3, "order": 1, "shape": 1} (interleaved). Default: each type once."""
    if mix is None:
        return VIDEO_QUESTION_TYPES
    if unknown := set(mix) - set(VIDEO_QUESTION_TYPES):
        raise ValueError(f"question mix: unknown types {sorted(unknown)}; known: {VIDEO_QUESTION_TYPES}")
    if any(not isinstance(k, int) or k < 0 for k in mix.values()) or not any(mix.values()):
        raise ValueError(f"question mix: shares must be whole numbers ≥ 0, not all 0; got {mix}")
    slots = sorted(((i + 0.5) / k, VIDEO_QUESTION_TYPES.index(q)) for q, k in mix.items() for i in range(k))
    return tuple(VIDEO_QUESTION_TYPES[t] for _, t in slots)


def make_video_example(
    seed: int,
    split: str,
    index: int,
    image_size: int = 56,
    n_frames: int = CLIP_FRAMES,
    cycle: tuple[str, ...] = VIDEO_QUESTION_TYPES,
) -> VideoQAExample:
    """Example `index` of `split`, a pure function of its arguments; its type is
    `cycle[index % len(cycle)]` (`question_cycle`)."""
    rng = np.random.default_rng([seed, SPLITS[split], index, 7])
    qtype = cycle[index % len(cycle)]
    return MAKERS[qtype](rng, image_size, n_frames)


def write_clip(path: Path, frames: np.ndarray, fps: int = FPS, crf: int = 12) -> None:
    """(N, H, W, 3) uint8 → an H.264 mp4 (yuv420p, constant frame rate); a low crf keeps the colours."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def chance_accuracy(rows: str | Path | Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per question type, the best a guess without the video's time order does: for questions that name
    their two options, the better of always picking the first or the second; otherwise the most common
    answer's share."""
    rows = read_jsonl(rows) if isinstance(rows, str | Path) else rows
    picks: dict[str, Counter[Any]] = {}
    for r in rows:
        key = r["options"].index(r["answer"]) if r.get("options") else r["answer"]
        picks.setdefault(r["question_type"], Counter())[key] += 1
    return {q: c.most_common(1)[0][1] / c.total() for q, c in sorted(picks.items())}


def generate_video_split(
    n: int, seed: int, split: str, image_size: int = 56, mix: dict[str, int] | None = None
) -> Iterator[VideoQAExample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    cycle = question_cycle(mix)
    for i in range(n):
        yield make_video_example(seed, split, i, image_size, cycle=cycle)


def write_video_qa_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    image_size: int = 56,
    train_mix: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`train.jsonl`, `val.jsonl` and `videos/{split}/{i:06d}.mp4` under `out_dir` (paths in the
    manifests are relative to it); returns the info written to `info.json`. `train_mix` weights the
    training split's question types; the held-out split has every type equally often. Files already
    written by an identical call are kept (the quickstart reruns cheaply)."""
    out = Path(out_dir)
    info: dict[str, Any] = {"seed": seed, "image_size": image_size, "clip_frames": CLIP_FRAMES,
                            "n": {"train": n_train, "val": n_val}, "train_mix": train_mix}  # fmt: skip
    done = out / "info.json"
    if done.is_file() and read_info(done) == info:
        return info
    for split, n in (("train", n_train), ("val", n_val)):
        folder = out / "videos" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        mix = train_mix if split == "train" else None
        for i, ex in enumerate(generate_video_split(n, seed, split, image_size, mix)):
            rel = f"videos/{split}/{i:06d}.mp4"
            write_clip(out / rel, ex.render())
            rows.append(ex.record(rel))
        write_jsonl(out / f"{split}.jsonl", rows)
    atomic_write_json(done, info)
    return info


def read_info(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


__all__ = [
    "CLIP_FRAMES",
    "VIDEO_QUESTION_TYPES",
    "VideoQAExample",
    "chance_accuracy",
    "make_video_example",
    "write_clip",
    "write_video_qa_dataset",
]
