"""Synthetic shapes QA: determinism, answers re-derived from scene metadata and pixels, chance, balance.

Also the contact sheet the quickstart draws from these images (herd.data.synthetic.image_grid).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from herd.data.synthetic.image_grid import grid_size, save_image_grid
from herd.data.synthetic.shapes import (
    BACKGROUND,
    QUESTION_TYPES,
    RGB,
    ShapeSpec,
    chance_accuracy,
    generate_split,
    make_example,
    question_cycle,
    write_shapes_dataset,
)
from herd.data.synthetic.text import COLORS, NUMBER_WORDS, SHAPES
from herd.data.training.image_text import ImageTextDataset

N = 400  # examples checked; generating without rendering takes milliseconds


def derive_answer(scene: list[ShapeSpec], question: str) -> str:
    """An independent reading of the question: parse it, find the named shapes, compute the answer.
    Asserts the question names exactly one object wherever it names one (no ambiguity)."""

    def one(pred) -> ShapeSpec:
        hits = [s for s in scene if pred(s)]
        assert len(hits) == 1, f"{question!r} is ambiguous for {scene}"
        return hits[0]

    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return one(lambda s: s.shape == m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return one(lambda s: s.color == m[1]).shape
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(scene)]
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        a = one(lambda s: (s.color, s.shape) == (m[1], m[2]))
        b = one(lambda s: (s.color, s.shape) == (m[3], m[4]))
        assert a is not b
        assert abs(a.cx - b.cx) >= a.size, "left/right must not hinge on a few pixels"
        return "left" if a.cx < b.cx else "right"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_the_scene_and_are_one_word() -> None:
    vocab = set(COLORS) | set(SHAPES) | set(NUMBER_WORDS[1:4]) | {"left", "right"}
    for ex in generate_split(N, seed=5):
        assert derive_answer(list(ex.scene), ex.question) == ex.answer, ex
        assert ex.answer in vocab
        # The full answer names the object the question asked about, then the scored word.
        if ex.question_type == "color":
            shape = re.fullmatch(r"What color is the (\w+)\?", ex.question)[1]
            assert ex.response == f"the {shape} is {ex.answer}", ex
        elif ex.question_type == "shape":
            color = re.fullmatch(r"What shape is the (\w+) object\?", ex.question)[1]
            article = "an" if color == "orange" else "a"
            assert ex.response == f"{article} {color} {ex.answer}", ex
        else:
            assert ex.response == ex.answer, ex
        assert 1 <= len(ex.scene) <= 3
        assert len({s.color for s in ex.scene}) == len(ex.scene)  # "the red object" is always one
        # The caption lists every shape, left to right.
        names = [f"{s.color} {s.shape}" for s in sorted(ex.scene, key=lambda s: s.cx)]
        positions = [ex.caption.index(n) for n in names]
        assert positions == sorted(positions), ex.caption
        assert ex.caption.startswith(NUMBER_WORDS[len(ex.scene)].capitalize())


def test_rendered_pixels_agree_with_the_scene() -> None:
    for ex in generate_split(60, seed=1, image_size=48):
        arr = np.asarray(ex.render())
        assert arr.shape == (48, 48, 3)
        for s in ex.scene:  # the centre of every shape (also a triangle's) has the shape's paint
            assert tuple(arr[int(s.cy), int(s.cx)]) == RGB[s.color]
        colours = {tuple(c) for c in arr.reshape(-1, 3)} - {BACKGROUND}
        assert colours == {RGB[s.color] for s in ex.scene}  # no other paint, no shape hidden


def test_determinism_and_splits() -> None:
    a = list(generate_split(40, seed=3))
    assert a == list(generate_split(40, seed=3))
    assert a[:10] == list(generate_split(10, seed=3))  # example i does not depend on n
    assert a[17] == make_example(3, "train", 17)
    assert a != list(generate_split(40, seed=4))
    val = list(generate_split(40, seed=3, split="val"))
    assert {ex.scene for ex in a}.isdisjoint(ex.scene for ex in val)
    with pytest.raises(ValueError, match="split"):
        next(generate_split(1, split="test"))


def test_question_types_are_balanced_and_chance_is_known() -> None:
    examples = list(generate_split(N, seed=0))
    counts = Counter(ex.question_type for ex in examples)
    assert set(counts) == set(QUESTION_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 1

    chance = chance_accuracy(examples)
    # Majority-answer accuracy: colours 1 of 6, shapes and counts 1 of 3, left/right 1 of 2 (+ noise).
    expected = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 2}
    for qtype, p in expected.items():
        assert p <= chance[qtype] <= p + 0.1, (qtype, chance[qtype])
    rows = [{"question_type": "count", "answer": a} for a in ["one", "two", "two", "three"]]
    rows.append({"question_type": "position", "answer": "left"})
    assert chance_accuracy(rows) == {"count": 0.5, "position": 1.0}


def test_question_mix_weights_the_training_split_only(tmp_path: Path) -> None:
    mix = {"color": 4, "shape": 2, "count": 1, "position": 1}
    cycle = question_cycle(mix)
    assert cycle == ("color", "shape", "color", "count", "position", "color", "shape", "color")
    assert question_cycle() == QUESTION_TYPES == question_cycle({q: 3 for q in QUESTION_TYPES})[:4]
    assert question_cycle({q: 3 for q in QUESTION_TYPES}) == QUESTION_TYPES * 3
    assert question_cycle({"color": 1}) == ("color",)
    examples = list(generate_split(16, seed=2, mix=mix))
    assert Counter(ex.question_type for ex in examples) == {"color": 8, "shape": 4, "count": 2, "position": 2}
    assert examples[3] == make_example(2, "train", 3, cycle=cycle)
    info = write_shapes_dataset(tmp_path, n_train=16, n_val=8, seed=2, image_size=32, train_mix=mix)
    assert info["splits"]["train"]["question_types"] == {"color": 8, "shape": 4, "count": 2, "position": 2}
    assert info["splits"]["val"]["question_types"] == {q: 2 for q in QUESTION_TYPES}
    for bad, match in (({"colour": 1}, "unknown question types"), ({"color": 0}, "whole numbers"),
                       ({"color": 1.5}, "whole numbers")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            question_cycle(bad)


def test_written_dataset_is_deterministic_and_readable(tmp_path: Path) -> None:
    info = write_shapes_dataset(tmp_path / "a", n_train=24, n_val=8, seed=7, image_size=32)
    write_shapes_dataset(tmp_path / "b", n_train=24, n_val=8, seed=7, image_size=32)
    for rel in ("train.jsonl", "val.jsonl", "info.json", "images/train/000013.png", "images/val/000007.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert info["splits"]["train"]["question_types"] == {q: 6 for q in QUESTION_TYPES}
    assert info == json.loads((tmp_path / "a" / "info.json").read_text())
    assert chance_accuracy(tmp_path / "a" / "val.jsonl") == info["splits"]["val"]["chance_accuracy"]

    ds = ImageTextDataset.from_jsonl(tmp_path / "a" / "train.jsonl", shuffle=False, loop=False)
    samples = list(ds)
    examples = list(generate_split(24, seed=7, image_size=32))
    assert len(samples) == 24 and ds.skipped.total == 0
    for s, ex in zip(samples, examples):
        assert (s["question"], s["answer"], s["response"], s["question_type"], s["caption"]) == (
            ex.question,
            ex.answer,
            ex.response,
            ex.question_type,
            ex.caption,
        )
        assert np.array_equal(np.asarray(s["image"]), np.asarray(ex.render()))
        assert [ShapeSpec(**d) for d in s["scene"]] == list(ex.scene)


def test_image_grid_size_and_content(tmp_path: Path) -> None:
    examples = list(generate_split(5, seed=2, image_size=32))
    images = [ex.render() for ex in examples]
    captions = [f"{ex.question} {ex.answer}" for ex in examples]
    captions[1] = "x" * 200 + " a caption far too long for three lines " * 5
    path = save_image_grid(images, captions, tmp_path / "sheet.png", cols=4, thumb=64, pad=4)
    sheet = Image.open(path)
    assert sheet.format == "PNG"
    # 4 columns: 4·64 + 5·4 = 276 wide; 2 rows of (64 + 3 lines · 16 + 4) + 4 = 236 high.
    assert sheet.size == grid_size(5, cols=4, thumb=64, pad=4) == (276, 236)
    arr = np.asarray(sheet.convert("RGB"))
    # The 32-px image is enlarged 2× (nearest) into its 64-px cell, so pixels land exactly.
    first = np.asarray(images[0].resize((64, 64), Image.Resampling.NEAREST))
    assert np.array_equal(arr[4:68, 4:68], first)
    text_band = arr[68 : 68 + 48, 4:68]
    assert (text_band < 100).any(), "caption text is drawn under the image"
    assert (arr[120:, 4 + 3 * 68 :] == 255).all(), "the empty 8th cell stays blank"
    assert save_image_grid(images[:2], captions[:2], tmp_path / "two.png").exists()
    assert Image.open(tmp_path / "two.png").size == grid_size(2)  # narrower: one row of two
    with pytest.raises(ValueError, match="captions"):
        save_image_grid(images, captions[:2], tmp_path / "bad.png")


def test_text_corpus_scene_questions_follow_the_image_datasets_rules() -> None:
    """The frozen LLM learns to answer from described scenes; an ambiguous text question (two squares,
    two red objects) would teach it to guess among the scene's colours instead of reading the scene."""
    import random

    from herd.data.synthetic.text import _scene_qa_doc

    rng = random.Random(0)
    seen = Counter()
    for _ in range(2000):
        doc = _scene_qa_doc(rng)
        objects = re.findall(r"There is a (\w+) (\w+)\.", doc)
        colors = [c for c, _ in objects]
        assert len(set(colors)) == len(colors), doc
        question, response = re.search(r"Question: (.*) Answer: ([\w ]+)\.$", doc).groups()
        answer = response.split()[-1]  # answers are worded as the image dataset's `response`
        if m := re.fullmatch(r"What color is the (\w+)\?", question):
            matches = [c for c, s in objects if s == m[1]]
            assert matches == [answer] and response == f"the {m[1]} is {answer}", doc
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            assert [s for c, s in objects if c == m[1]] == [answer], doc
            assert response.endswith(f" {m[1]} {answer}"), doc
        elif question == "How many shapes are there?":
            assert NUMBER_WORDS[len(objects)] == response, doc
        else:
            assert answer in ("left", "right") and f"is {answer} of the" in doc, doc
        seen[question.split()[1]] += 1
    assert min(seen.values()) > 300, seen  # every question type is common


def test_the_quickstart_vocabulary_has_every_word_of_the_image_dataset() -> None:
    """The quickstart trims the Llama 3 vocabulary to the text corpus's tokens; a caption word outside
    it ("Two", "from", "and") would be trained on as the unknown token. The corpus writes captions,
    questions and answers in the image dataset's words, and captions come from the same function."""
    from herd.data.synthetic.text import generate_corpus, scene_caption
    from herd.tasks.vision import qa_prompt
    from herd.text.tokenizer import load_tokenizer
    from herd.text.vocab_subset import SubsetTokenizer

    vocab = SubsetTokenizer.from_texts(load_tokenizer(None), generate_corpus(2000, seed=0))
    for ex in generate_split(400, seed=0, image_size=56):
        for text in (ex.caption, f"{qa_prompt(ex.question)} {ex.response}"):  # as VisionTask encodes them
            vocab.encode(text, bos=False, eos=False)
    assert vocab.unknown_count == 0
    assert scene_caption([("orange", "circle")]) == "One shape: an orange circle."
    assert scene_caption([("red", "circle"), ("blue", "square"), ("green", "triangle")]) == (
        "Three shapes, from left to right: a red circle, a blue square and a green triangle."
    )
