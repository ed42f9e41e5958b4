"""The paper's §5.1 analyses without a trained model: 8-gram contamination against brute force and planted
overlaps (jsonl and token-shard corpora), and the robustness variants under scorers whose answers are known."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from herd.data.records import SkipCounter
from herd.evaluation.contamination import NgramIndex, ngram_hashes, shard_blocks
from herd.evaluation.contamination_job import run_contamination
from herd.evaluation.robustness import (
    LABEL_SETS,
    MCRecord,
    build_variants,
    read_mc_records,
    robustness_report,
    rotate_to,
)


def brute_force_covered(example: list[int], corpus_docs: list[list[int]], n: int = 8) -> int:
    grams = {tuple(d[i : i + n]) for d in corpus_docs for i in range(len(d) - n + 1)}
    covered = [False] * len(example)
    for i in range(len(example) - n + 1):
        if tuple(example[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(covered)


def test_ngram_overlap_equals_brute_force_with_blocks_of_any_size() -> None:
    rng = random.Random(0)
    corpus = [
        [rng.randrange(3) for _ in range(rng.randint(5, 60))] for _ in range(40)
    ]  # small vocab: many hits
    examples = [[rng.randrange(3) for _ in range(rng.randint(3, 30))] for _ in range(25)]
    examples.append(corpus[3][5:25])  # planted: fully covered
    stream = np.concatenate([np.array(d + [99]) for d in corpus])  # 99 separates documents, as EOS does
    for block in (7, 8, 13, 10_000):  # blocks overlap by n-1 = 7 tokens
        index = NgramIndex.build(examples)
        for start in range(0, len(stream), block):
            index.scan(stream[max(0, start - 7) : start + block])
        got = [o.covered for o in index.overlaps(0.5)]
        assert got == [brute_force_covered(e, corpus) for e in examples], block
    assert got[-1] == 20 and 0 < sum(g > 0 for g in got[:-1]) < 25  # some partial overlaps, not all
    assert len(ngram_hashes(np.arange(7))) == 0 and len(ngram_hashes(np.arange(9))) == 2


WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "window",
    "garden",
    "pencil",
    "orange",
    "silver",
    "tiger",
    "piano",
    "candle",
    "forest",
    "rocket",
]


def sentence(rng: random.Random, k: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


@pytest.fixture
def planted(tmp_path):
    """Tasks `qa` (10 text records with `correct`) and `mc` (6 multiple-choice records, 2 bad lines); a jsonl
    corpus of unrelated sentences in which qa examples 1, 4, 7 and mc example 2 appear verbatim."""
    rng = random.Random(1)
    qa = [{"text": f"Q{i}: " + sentence(rng), "correct": int(i % 3 == 1)} for i in range(10)]
    mc = [
        {"question": f"Which {i}? " + sentence(rng, 10), "choices": ["x", "zebra kite"], "answer": 1}
        for i in range(6)
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc) + "not json\n{}\n")
    docs = ["filler " + " ".join(f"w{j}" for j in range(i, i + 30)) for i in range(50)]
    docs[10] += " " + qa[1]["text"] + " and more"
    docs[20] = qa[4]["text"]
    docs[30] = "prefix " + qa[7]["text"]
    docs[40] = f"{mc[2]['question']} {mc[2]['choices'][1]}"
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp_path


def test_planted_contamination_found_exactly_in_jsonl_and_token_shards(planted) -> None:
    from herd.data.training.text_sources import tokenize_corpus
    from herd.text.tokenizer import Tokenizer

    tok = Tokenizer()
    qa_records = [json.loads(x) for x in (planted / "qa.jsonl").read_text().splitlines()]
    docs = [tok.encode(json.loads(x)["text"]) for x in (planted / "corpus.jsonl").read_text().splitlines()]
    shards = planted / "shards"
    tokenize_corpus("jsonl", [planted / "corpus.jsonl"], shards, shard_tokens=200, progress=False)
    for corpus in (planted / "corpus.jsonl", shards):
        out = planted / f"out_{corpus.name}"
        report = run_contamination(
            [planted / "qa.jsonl", planted / "mc.jsonl"], [corpus], out, progress=False
        )
        full = json.loads((out / "contamination.json").read_text())
        qa, mc = full["tasks"]["qa"], full["tasks"]["mc"]
        assert [i for i, f in enumerate(qa["overlap"]) if f > 0] == [1, 4, 7]
        # brute force over the same tokens (a planted text inside a sentence starts with " Q" not "Q")
        expected = [round(brute_force_covered(tok.encode(r["text"]), docs) / len(tok.encode(r["text"])), 4)
                    for r in qa_records]  # fmt: skip
        assert qa["overlap"] == expected and expected[4] == 1.0 and min(expected[1], expected[7]) > 0.9
        assert (qa["contaminated"], qa["examples"], qa["contaminated_fraction"]) == (3, 10, 0.3)
        # `correct` is 1 exactly on examples 1, 4, 7: the contaminated subset scores 1.0, the clean 0.0
        assert (qa["score_contaminated"], qa["score_clean"], qa["score_all"]) == (1.0, 0.0, 0.3)
        assert [i for i, f in enumerate(mc["overlap"]) if f > 0] == [2] and mc[
            "contaminated_fraction"
        ] == 1 / 6
        assert report["skipped"] == {"bad_json": 1, "missing_fields": 1}
        assert (out / "contamination.png").stat().st_size > 1000
    assert len(json.loads((shards / "manifest.json").read_text())["shards"]) > 1
    blocks = list(shard_blocks(shards, block=16))
    assert all(len(b) <= 16 + 7 for b in blocks) and len(blocks) > 10


# --- robustness -----------------------------------------------------------------------------------------
def successor_records(n: int = 12) -> list[MCRecord]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        wrong = rng.sample([str(k) for k in range(40, 60)], 3)
        choices = [str(i + 1), *wrong]
        rng.shuffle(choices)
        out.append(MCRecord(f"What comes after {i}?", tuple(choices), choices.index(str(i + 1))))
    return out


def first_label_scorer(pairs):
    """Always prefers the first label of the set: a pure position bias."""
    firsts = {labels[0] for labels in LABEL_SETS.values()}
    return [0.0 if cont.strip() in firsts else -1.0 for _, cont in pairs]


def knowing_scorer(pairs):
    """Reads the last question of the prompt and prefers the label whose choice is its successor."""
    out = []
    for prompt, cont in pairs:
        question = prompt.rsplit("\n\n", 1)[-1]
        n = int(re.search(r"after (\d+)\?", question).group(1))
        label = cont.strip()
        line = next(x for x in question.splitlines() if x.startswith(f"{label}. "))
        out.append(0.0 if line[len(label) + 2 :] == str(n + 1) else -1.0)
    return out


def test_variants_move_the_answer_and_keep_labels_consistent() -> None:
    records = successor_records()
    variants = build_variants(records, shots=3)
    assert set(variants) == {
        "labels:letters", "labels:numbers", "labels:symbols", "labels:lowercase",
        "order:0", "order:1", "order:2", "order:3", "fewshot:all_first", "fewshot:balanced", "fewshot:all_last",
    }  # fmt: skip
    rotated = rotate_to(records[0], 2)
    assert rotated.choices[2] == records[0].choices[records[0].answer]
    assert sorted(rotated.choices) == sorted(records[0].choices)
    shots = variants["fewshot:all_last"][0][0].split("\n\n")[:-1]
    assert len(shots) == 3 and all(s.endswith("Answer: D") for s in shots)
    assert {s[-1] for s in variants["fewshot:balanced"][5][0].split("\n\n")[:-1]} == {"A", "B", "C"}
    assert "$. " in variants["labels:symbols"][0][0] and variants["labels:symbols"][0][1] == (
        "$",
        "&",
        "#",
        "@",
    )

    known = robustness_report(records, knowing_scorer, shots=3)
    assert set(known["accuracy"].values()) == {1.0} and known["spread"]["all"]["range"] == 0.0
    biased = robustness_report(records, first_label_scorer, shots=3)
    base = sum(r.answer == 0 for r in records) / len(records)
    acc = biased["accuracy"]
    assert acc["order:0"] == 1.0 and acc["order:1"] == acc["order:2"] == acc["order:3"] == 0.0
    assert acc["labels:letters"] == acc["labels:symbols"] == acc["fewshot:all_last"] == base
    assert biased["spread"]["order"]["range"] == 1.0 and biased["spread"]["order"]["std"] == pytest.approx(
        0.4330127
    )
    assert biased["chance"] == 0.25


def test_bad_multiple_choice_records_are_counted(tmp_path) -> None:
    path = tmp_path / "mc.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer": 1}
    lines = [good, {"question": "q", "choices": ["a"], "answer": 0}, {"question": "q", "choices": ["a", "b"], "answer": 2},
             {"choices": ["a", "b"], "answer": 0}, [1, 2]]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{oops\n\n")
    skipped = SkipCounter()
    assert read_mc_records(path, skipped) == [MCRecord("q", ("a", "b"), 1)]
    assert dict(skipped.counts) == {
        "choice_count": 1,
        "bad_answer": 1,
        "missing_fields": 1,
        "not_an_object": 1,
        "bad_json": 1,
    }


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys) -> None:
    from herd.cli import main

    missing = tmp_path / "missing.jsonl"
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    cases = [
        (["eval", "lm", "--model", "m", "--tasks", str(missing.with_suffix(".yaml")), "--out", str(tmp_path)],
         f"herd eval lm: error: {missing.with_suffix('.yaml')}: task file does not exist"),
        (["eval", "lm", "--model", "m", "--tasks", str(tmp_path / "notask.yaml"), "--out", str(tmp_path)],
         f"herd eval lm: error: {tmp_path / 'notask.yaml'}: no `task:` name in the YAML"),
        (["eval", "contamination", "--tasks", "t", "--corpus", "c", "--threshold", "2", "--out", str(tmp_path)],
         "herd eval contamination: error: --threshold must be in (0, 1], not 2.0"),
        (["eval", "vqa", "--model", "m", "--data", str(missing), "--out", str(tmp_path)],
         f"herd eval vqa: error: {missing}: No such file or directory"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(message), (argv, err)
