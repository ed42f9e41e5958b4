"""The video quickstart's clips: their answers follow the frames, a frame-order-blind model has nothing to
go on for direction and order, and the files decode back to what was drawn."""

import numpy as np
import pytest

from herd.data.synthetic.video_qa import (
    CLIP_FRAMES,
    chance_accuracy,
    make_video_example,
    question_cycle,
    write_video_qa_dataset,
)
from herd.vision.video import read_frames


def centres(scene):
    return {s.name: (s.cx, s.cy) for s in scene}


@pytest.mark.parametrize("index", range(0, 60, 3))  # every third example is a direction question
def test_direction_answer_follows_the_motion(index):
    ex = make_video_example(0, "train", index)
    assert ex.question_type == "direction" and ex.answer in ex.options
    name = ex.question.split("the ", 1)[1].split(" going")[0]
    (x0, y0), (x1, y1) = centres(ex.frames[0])[name], centres(ex.frames[-1])[name]
    moved = {"left": x0 - x1, "right": x1 - x0, "above": y0 - y1, "below": y1 - y0}[ex.answer]
    assert moved == pytest.approx(0.4 * 56)  # TRAVEL of the canvas, in the answered direction


def test_order_clips_show_both_shapes_equally_often():
    """Shuffled frames cannot tell which came first: each shape is on screen in as many frames."""
    for index in range(1, 90, 3):
        ex = make_video_example(0, "val", index)
        assert ex.question_type == "order"
        seen = [c for scene in ex.frames for c in (s.color for s in scene)]
        first = {s.color for s in ex.frames[0]}
        assert first == {ex.answer} and sorted(set(seen)) == sorted(ex.options)
        assert seen.count(ex.options[0]) == seen.count(ex.options[1])


def test_the_frame_set_does_not_give_the_direction_away():
    """Over many clips the start (or end) position of the mover has the same distribution for both
    answers of an axis: the path's centre is drawn uniformly and travelled either way."""
    mids = {"left": [], "right": []}
    for index in range(0, 3000, 3):
        ex = make_video_example(1, "train", index)
        if ex.answer in mids:
            name = ex.question.split("the ", 1)[1].split(" going")[0]
            xs = [centres(f)[name][0] for f in ex.frames]
            mids[ex.answer].append((min(xs) + max(xs)) / 2)
    left, right = np.array(mids["left"]), np.array(mids["right"])
    assert abs(len(left) - len(right)) < 0.15 * len(left)
    assert abs(left.mean() - right.mean()) < 1.0 and abs(left.std() - right.std()) < 1.0  # pixels


def test_mix_and_chance():
    assert question_cycle({"direction": 2, "order": 1, "shape": 1}).count("direction") == 2
    with pytest.raises(ValueError, match="unknown"):
        question_cycle({"colour": 1})
    rows = [
        {"question_type": "direction", "answer": a, "options": ["left", "right"]}
        for a in ["l", "r", "r", "r"]
    ]
    rows = [dict(r, answer="left" if r["answer"] == "l" else "right") for r in rows]
    rows += [{"question_type": "shape", "answer": s, "options": []} for s in ("circle", "circle", "square")]
    assert chance_accuracy(rows) == {"direction": 0.75, "shape": pytest.approx(2 / 3)}


def test_written_clips_decode_to_the_drawn_frames(tmp_path):
    info = write_video_qa_dataset(
        tmp_path, n_train=6, n_val=3, seed=0, train_mix={"direction": 1, "order": 1}
    )
    assert info["train_mix"] == {"direction": 1, "order": 1}
    ex = make_video_example(0, "train", 0, cycle=question_cycle({"direction": 1, "order": 1}))
    clip = read_frames(tmp_path / "videos" / "train" / "000000.mp4", CLIP_FRAMES)
    assert clip.num_video_frames == CLIP_FRAMES and bool(clip.mask.all())
    drawn = ex.render().astype(np.int16)
    err = np.abs(clip.frames.numpy().astype(np.int16) - drawn)
    assert err.mean() < 3.0  # H.264 at crf 12, 4:2:0: edges blur, colours stay
    assert (
        write_video_qa_dataset(tmp_path, n_train=6, n_val=3, seed=0, train_mix={"direction": 1, "order": 1})
        == info
    )
