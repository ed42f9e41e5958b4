"""A generated English corpus for the CPU quickstart and tests: small, deterministic, learnable.

Several kinds of document, so that a tiny model's progress can be *measured* after a few hundred steps:
- arithmetic questions ("Question: what is 3 plus 4? Answer: 7."), exact facts the model must recall;
- scene descriptions of coloured shapes (the vocabulary the vision quickstart's captions use);
- counting sequences;
- described scenes with a question about them, in the image-QA dataset's exact wording;
- image captions in the image dataset's exact wording.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class QAPair:
    prompt: str  # ends right before the answer
    answer: str  # expected continuation, e.g. " 7"


def arithmetic_facts() -> list[QAPair]:
    """All single-digit additions as (prompt, answer)."""
    return [
        QAPair(f"Question: what is {a} plus {b}? Answer:", f" {a + b}") for a in range(10) for b in range(10)
    ]


def _arithmetic_doc(rng: random.Random) -> str:
    facts = rng.sample(arithmetic_facts(), k=rng.randint(2, 5))
    return " ".join(f"{q.prompt}{q.answer}." for q in facts)


def _scene_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        c1, c2 = rng.sample(COLORS, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        sentences.append(f"The {c1} {s1} is {rng.choice(POSITIONS)} the {c2} {s2}.")
    n = rng.randint(1, 3)
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    plural = shape + ("s" if n > 1 else "")
    sentences.append(f"There {'are' if n > 1 else 'is'} {NUMBER_WORDS[n]} {color} {plural} in the picture.")
    return " ".join(sentences)


def _counting_doc(rng: random.Random) -> str:
    start = rng.randint(0, 5)
    length = rng.randint(3, 11 - start)
    return "Count: " + " ".join(NUMBER_WORDS[start : start + length]) + "."


def with_article(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def restated_answer(kind: str, color: str, shape: str, answer: str) -> str:
    """The full answer the quickstart trains on: colour and shape answers name their object first
    ("the square is red", "a red circle"), so the answered word comes right after the word that
    says which object is meant, as in a caption. Measured: with one-word answers the adapter reads
    the right property of the wrong object (docs/vision.md, "What limits it"). Other kinds: the word."""
    if kind == "color":
        return f"the {shape} is {color}"
    if kind == "shape":
        return with_article(color, shape)
    return answer


def scene_caption(objects_left_to_right: list[tuple[str, str]]) -> str:
    """The image dataset's caption of (colour, shape) objects ordered left to right: "Two shapes, from
    left to right: a red circle and an orange square." Written here, in the corpus's module, so the text
    model reads captions in exactly these words (and its trimmed vocabulary has all of them)."""
    names = [with_article(c, s) for c, s in objects_left_to_right]
    count = NUMBER_WORDS[len(names)].capitalize()
    if len(names) == 1:
        return f"{count} shape: {names[0]}."
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{count} shapes, from left to right: {listed}."


def _caption_doc(rng: random.Random) -> str:
    objects = [(c, rng.choice(SHAPES)) for c in rng.sample(COLORS, rng.randint(1, 3))]
    return scene_caption(objects)


def _scene_qa_doc(rng: random.Random) -> str:
    """A described scene and a question about it, worded exactly as the image-QA dataset asks and
    drawn under its rules (distinct colours in a scene; a colour question names a shape that occurs
    once): the frozen LLM learns to answer from a described scene; an image adapter only has to add
    the scene. An ambiguous question here would teach the LLM to guess among the scene's colours."""
    n = rng.randint(1, 3)
    kind = rng.choice(("color", "shape", "count", "position"))
    if kind == "position" and n < 2:
        kind = "count"
    colors = rng.sample(COLORS, n)
    while True:
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        if kind != "color" or any(shapes.count(s) == 1 for s in shapes):
            break
    objects = list(zip(colors, shapes))
    xs = rng.sample(range(10), n)
    scene = " ".join(f"There is a {c} {s}." for c, s in objects)
    if kind == "color":
        c, s = rng.choice([o for o in objects if shapes.count(o[1]) == 1])
        question, answer = f"What color is the {s}?", restated_answer(kind, c, s, c)
    elif kind == "shape":
        c, s = rng.choice(objects)
        question, answer = f"What shape is the {c} object?", restated_answer(kind, c, s, s)
    elif kind == "count":
        question, answer = "How many shapes are there?", NUMBER_WORDS[n]
    else:
        i, j = rng.sample(range(n), 2)
        (c1, s1), (c2, s2) = objects[i], objects[j]
        question, answer = (
            f"Is the {c1} {s1} left or right of the {c2} {s2}?",
            "left" if xs[i] < xs[j] else "right",
        )
        scene += f" The {c1} {s1} is {answer} of the {c2} {s2}."
    return f"{scene} Question: {question} Answer: {answer}."


def generate_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    makers = (
        _arithmetic_doc, _arithmetic_doc, _scene_doc, _counting_doc, _scene_qa_doc, _scene_qa_doc, _caption_doc,
    )  # fmt: skip
    return [rng.choice(makers)(rng) for _ in range(n_docs)]
