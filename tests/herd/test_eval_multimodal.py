"""VQA answer normalisation and accuracy against golden values, WER/CER by hand, per-type scoring on
hand-made predictions, and `herd eval vqa` end to end on a tiny (untrained) vision checkpoint."""

from __future__ import annotations

import json

import pytest

from herd.cli import main
from herd.evaluation.answers import error_rates, exact_match, normalize_vqa_answer, vqa_accuracy
from herd.evaluation.multimodal import score_predictions

pytest.importorskip("jiwer")


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two", "2"), ("ten.", "10"), ("none", "0"), ("the cat.", "cat"), ("a red and white bus", "red and white bus"),
        ("yes!", "yes"), (" Yes\n", "yes"), ("dont know", "don't know"), ("It's red", "it's red"),
        ("3.5", "3.5"), ("1,000", "1000"), ("black/white", "black white"), ("t-shirt", "t shirt"),
        ("on the left,  ", "on left"), ("(hot dog)", "hot dog"), ("an apple", "apple"),
    ],
)  # fmt: skip
def test_vqa_normalisation_golden(raw: str, normal: str) -> None:
    assert normalize_vqa_answer(raw) == normal


def test_vqa_accuracy_ten_annotators() -> None:
    # k of 10 annotators said "2": leave-one-out mean of min(matches/3, 1) = 0, 0.3, 0.6, 0.9, 1, 1
    got = [vqa_accuracy("two", ["2"] * k + ["3"] * (10 - k)) for k in range(6)]
    assert got == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0 and vqa_accuracy("cat", ["dog"]) == 0.0
    assert exact_match("the square is red.", ["red", "The square is red"]) == 1.0


def test_error_rates_by_hand() -> None:
    # 8 reference words; "sat" → "sit" and a deleted "the": 2 edits; punctuation and case are normalised away
    rates = error_rates(["The cat sat on the mat.", "Hello, world!"], ["the cat sit on mat", "hello world"])
    assert rates["wer"] == pytest.approx(2 / 8)
    assert rates["cer"] == pytest.approx(5 / 33)  # 22 + 11 characters; 1 substitution + "the " deleted
    assert error_rates(["a b"], [""]) == {"wer": 1.0, "cer": 1.0}


def test_scores_per_question_type_beside_best_constant() -> None:
    recs = [
        {"type": "color", "references": ["red"], "several": False},
        {"type": "color", "references": ["red"], "several": False},
        {"type": "color", "references": ["blue"], "several": False},
        {"type": "count", "references": ["2"] * 3 + ["3"] * 7, "several": True},
    ]
    report = score_predictions("vqa", recs, ["Red.", "blue", "blue", "three"])
    per = report["per_type"]
    assert per["color"] == {"count": 3, "accuracy": pytest.approx(2 / 3), "baseline": pytest.approx(2 / 3)}
    assert per["count"]["accuracy"] == 1.0 and per["count"]["baseline"] == 1.0
    assert per["overall"]["accuracy"] == pytest.approx(3 / 4)
    asr = score_predictions("asr", [{"type": "all", "references": ["one two"], "several": False}], ["one"])
    assert asr["per_type"]["all"]["wer"] == 0.5


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    """The server tests' checkpoints (tiny LLM, untrained image adapter with open gates, untrained speech
    adapter) and 8 held-out shape questions."""
    from serve_workspace import write_serve_workspace

    from herd.data.synthetic.shapes import write_shapes_dataset

    root = write_serve_workspace(tmp_path_factory.mktemp("mm"))
    write_shapes_dataset(root / "shapes", n_train=1, n_val=8, seed=0, image_size=56)
    return root


def test_herd_eval_vqa_end_to_end(vision_model) -> None:
    from herd.ask import VisionQA, read_image

    root = vision_model
    val = root / "shapes" / "val.jsonl"
    data = root / "shapes" / "eval.jsonl"
    good = [json.loads(x) for x in val.read_text().splitlines()]
    bad = ["{not json", json.dumps({"question": "no image"}), json.dumps({**good[0], "image": "missing.png"})]
    data.write_text("\n".join([*map(json.dumps, good), *bad]) + "\n")
    out = root / "vqa_out"
    assert main(["eval", "vqa", "--model", str(root / "image_model"), "--data", str(data), "--out", str(out),
                 "--batch-size", "3", "--max-new-tokens", "4"]) == 0  # fmt: skip
    report = json.loads((out / "vqa.json").read_text())
    assert report["examples"] == 8
    assert report["skipped"] == {"bad_json": 1, "missing_fields": 1, "missing_file": 1}
    preds = [json.loads(x)["prediction"] for x in (out / "vqa_predictions.jsonl").read_text().splitlines()]
    # the same answers `herd ask` gives, one batch of all eight
    qa = VisionQA.load(root / "image_model")
    direct = qa.ask(
        [read_image(root / "shapes" / r["image"]) for r in good], [r["question"] for r in good], 4
    )
    assert preds == direct
    expected = sum(normalize_vqa_answer(p) in {normalize_vqa_answer(r["answer"]), normalize_vqa_answer(r["response"])}
                   for p, r in zip(preds, good)) / 8  # fmt: skip
    assert report["per_type"]["overall"]["accuracy"] == pytest.approx(expected)
    assert set(report["per_type"]) == {r["question_type"] for r in good} | {"overall"}
    assert (out / "vqa.png").stat().st_size > 1000


def test_herd_eval_asr_end_to_end(vision_model) -> None:
    from serve_workspace import wav_bytes

    from herd.ask import SpeechQA

    root = vision_model
    folder = root / "asr"
    folder.mkdir()
    texts = ["the cat sat on the mat", "one two three", "hello"]
    for i, freq in enumerate((330.0, 440.0, 550.0)):
        (folder / f"{i}.wav").write_bytes(wav_bytes(0.4 + 0.1 * i, freq))
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav")
    rows = [
        {"audio": f"{i}.wav", "text": t, "question_type": "short" if i else "long"}
        for i, t in enumerate(texts)
    ]
    rows += [{"audio": "broken.wav", "text": "x"}, {"audio": "0.wav"}]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "asr_out"
    assert main(["eval", "asr", "--model", str(root / "speech_model"), "--data", str(folder / "test.jsonl"),
                 "--out", str(out), "--max-new-tokens", "4"]) == 0  # fmt: skip
    report = json.loads((out / "asr.json").read_text())
    assert report["examples"] == 3 and report["skipped"] == {"missing_fields": 1, "unreadable_media": 1}
    preds = [json.loads(x)["prediction"] for x in (out / "asr_predictions.jsonl").read_text().splitlines()]
    qa = SpeechQA.load(root / "speech_model")
    clips = [SpeechQA.read(folder / f"{i}.wav") for i in range(3)]
    assert preds == qa.ask(clips, [qa.transcribe_prompt()] * 3, 4)
    assert report["per_type"]["overall"]["wer"] == pytest.approx(error_rates(texts, preds)["wer"])
    assert report["per_type"]["short"]["count"] == 2 and (out / "asr.png").stat().st_size > 1000


def test_herd_eval_video_qa_end_to_end(vision_model) -> None:
    from serve_workspace import mp4_bytes, write_video_model

    from herd.ask import VideoQA

    root = vision_model
    model = write_video_model(root)
    folder = root / "videos"
    folder.mkdir()
    for n in (5, 8, 12):
        (folder / f"{n}.mp4").write_bytes(mp4_bytes(folder, n))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    rows = [
        {
            "video": f"{n}.mp4",
            "question": "Is the red square going left or right?",
            "answer": "left",
            "question_type": "direction",
        }
        for n in (5, 8)
    ] + [
        {
            "video": "12.mp4",
            "question": "How many squares are there?",
            "answer": "2",
            "question_type": "count",
        }
    ]
    rows += [{"video": "broken.mp4", "question": "q", "answer": "a"}, {"video": "5.mp4"}]  # fmt: skip
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "video_out"
    assert main(["eval", "video-qa", "--model", str(model), "--data", str(folder / "test.jsonl"),
                 "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2"]) == 0  # fmt: skip
    report = json.loads((out / "video_qa.json").read_text())
    assert report["examples"] == 3 and report["skipped"] == {"missing_fields": 1, "unreadable_media": 1}
    preds = [
        json.loads(x)["prediction"] for x in (out / "video_qa_predictions.jsonl").read_text().splitlines()
    ]
    qa = VideoQA.load(model)  # the same answers `herd ask --video` gives, in one batch
    assert preds == qa.ask(
        [qa.read(folder / f"{n}.mp4") for n in (5, 8, 12)], [r["question"] for r in rows[:3]], 4
    )
    assert report["per_type"]["direction"]["count"] == 2 and report["per_type"]["count"]["count"] == 1
    expected = (
        sum(normalize_vqa_answer(p) == normalize_vqa_answer(r["answer"]) for p, r in zip(preds, rows)) / 3
    )
    assert report["per_type"]["overall"]["accuracy"] == pytest.approx(expected)
