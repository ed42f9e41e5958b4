"""A scraped manifest: good images mixed with broken files and lines of ~25 kinds. The vision task trains
through them without a crash, skips and counts each bad record by reason, keeps every unusual but valid
image, logs the counts in metrics.jsonl and on the console at every log step, and refuses at start-up a
manifest with nothing usable left (naming the counts)."""

import io
import json
import struct
import zlib

import pytest
from PIL import Image
from tiny_workspaces import write_vision_workspace

from herd.config import load_config
from herd.data.training.image_text import ImageTextDataset
from herd.metrics import read_metrics
from herd.task import build_task
from herd.tasks.vision import missing_fields
from herd.trainer import train

QA = {"question": "How many shapes are there?", "answer": "one", "response": "one"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with one tiny (wrong) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def image_bytes(mode: str, size: tuple[int, int], fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 200, 128), "L": 90, "P": 3, "CMYK": (0, 255, 255, 0),
             "I;16": 4000, "1": 1, "LA": (50, 200)}[mode]  # fmt: skip
    Image.new(mode, size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def write_scraped_manifest(root):
    """`root/scraped.jsonl` and its files; returns (expected skips by reason, kept record count)."""
    img = root / "scraped"
    img.mkdir()
    good = image_bytes("RGB", (56, 56))
    files = {
        "good.png": good,
        # unusual but valid: all must be kept
        "rgba.png": image_bytes("RGBA", (40, 70)), "gray.png": image_bytes("L", (56, 56)),
        "palette.png": image_bytes("P", (30, 30)), "cmyk.jpg": image_bytes("CMYK", (56, 56), "JPEG"),
        "sixteen_bit.png": image_bytes("I;16", (20, 20)), "bilevel.png": image_bytes("1", (56, 56)),
        "gray_alpha.png": image_bytes("LA", (56, 56)), "tiny.png": image_bytes("RGB", (1, 1)),
        "strip.png": image_bytes("RGB", (400, 2)), "tall.png": image_bytes("RGB", (3, 500)),
        "photo.webp": image_bytes("RGB", (56, 56), "WEBP"), "anim.gif": image_bytes("P", (56, 56), "GIF"),
        "jpeg_named.png": image_bytes("RGB", (56, 56), "JPEG"),  # the content decides, not the name
        # broken files
        "empty.png": b"", "text.png": b"this is not an image\n", "half.png": good[: len(good) // 2],
        "garbled.png": good[:40] + bytes(200) + good[240:], "half.jpg": image_bytes("RGB", (56, 56), "JPEG")[:300],
        "bomb.png": png_header_only(100_000, 100_000), "html.jpg": b"<html><body>404 Not Found</body></html>",
    }  # fmt: skip
    for name, data in files.items():
        (img / name).write_bytes(data)
    (img / "a_folder.png").mkdir()

    def rec(image, **fields):
        return json.dumps({"image": f"scraped/{image}", **fields})

    valid_names = [n for n in files if n in ("good.png", "rgba.png", "gray.png", "palette.png", "cmyk.jpg",
                   "sixteen_bit.png", "bilevel.png", "gray_alpha.png", "tiny.png", "strip.png", "tall.png",
                   "photo.webp", "anim.gif", "jpeg_named.png")]  # fmt: skip
    lines = [rec(n, **QA) for n in valid_names for _ in range(2)]  # 28 usable records
    expected = {
        "bad_json": 3, "not_an_object": 2, "no_image_field": 4, "missing_question": 2, "missing_answer": 2,
        "missing_file": 1, "not_an_image": 4, "truncated_image": 2, "not_a_readable_file": 1, "too_large": 1,
    }  # fmt: skip
    lines += [
        "{not json", '{"image": "scraped/good.png", "question": "q"',  # bad_json ×2 (one cut short)
        "[1, 2, 3]", '"a string"',  # not_an_object ×2
        json.dumps(QA), json.dumps({"image": 7, **QA}), json.dumps({"image": "", **QA}),
        json.dumps({"img": "scraped/good.png", **QA}),  # no_image_field ×4
        rec("good.png", answer="one"), rec("good.png", question="   ", answer="one"),  # missing_question ×2
        rec("good.png", question="How many?"), rec("good.png", question="How many?", answer=None),  # missing_answer
        rec("nowhere.png", **QA),  # missing_file
        rec("a_folder.png", **QA),  # not_a_readable_file
        rec("empty.png", **QA), rec("text.png", **QA), rec("html.jpg", **QA),
        rec("garbled.png", **QA),  # not_an_image ×4 (empty, text, html, a broken header)
        rec("half.png", **QA), rec("half.jpg", **QA),  # truncated_image ×2
        rec("bomb.png", **QA),  # too_large: a header claiming 100,000 × 100,000 pixels
    ]  # fmt: skip
    raw = (
        "\n".join(lines) + "\n"
    ).encode() + b'{"image": "scraped/good.png", "question": "\xff\xfe"}\n'  # bad UTF-8
    (root / "scraped.jsonl").write_bytes(raw + b"\n\n")  # blank lines are not records
    return expected, 28  # usable records


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    root = write_vision_workspace(tmp_path_factory.mktemp("scraped"), 8, 4)
    expected, kept = write_scraped_manifest(root)
    return root, expected, kept


def config(root, run_dir, manifest, *extra):
    return load_config(None, [
        f"--vision.llm={root / 'llm'}", f"--vision.train_manifest={manifest}", "--vision.cross_attention_every=1",
        f"--train.run_dir={run_dir}", "--data.batch_size=8", "--train.steps=6", "--metrics.log_every=2",
        "--train.eval_every=0", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
        "--checkpoint.resume=none", "--train.device=cpu", *extra,
    ])  # fmt: skip


def test_training_runs_through_a_scraped_manifest_and_logs_every_skip(scraped, tmp_path, capsys):
    root, expected, kept = scraped
    task = build_task("vision", config(root, tmp_path, root / "scraped.jsonl"))
    result = train(task=task, cfg=config(root, tmp_path, root / "scraped.jsonl"), show_progress=False)
    assert len(result.history) == 3 and all(h["loss"] == h["loss"] for h in result.history)
    skipped = result.skipped["train"]
    # 2 of "bad_json" are the lines above, the third the line of invalid UTF-8
    assert skipped == expected, skipped
    assert len(task.train_data.records) == kept + 9  # indexed: usable + the 9 whose image fails to read
    last = read_metrics(tmp_path)[-1]  # metrics.jsonl: every log step carries the counts by reason
    assert last["skipped/train"] == sum(expected.values())
    assert {
        k.removeprefix("skipped/train/"): v for k, v in last.items() if k.startswith("skipped/train/")
    } == expected
    err = capsys.readouterr().err
    assert "skipped/train/too_large" in err and "skipped records: train: 22" in err


def test_every_unusual_but_valid_image_is_kept(scraped):
    root, _, kept = scraped
    data = ImageTextDataset.from_jsonl(
        root / "scraped.jsonl", check=missing_fields("qa"), loop=False, shuffle=False
    )
    samples = list(data)  # one epoch: a bad image's round takes the next readable record instead
    assert len(samples) == len(data.records) == kept + 9 and all(s["image"].mode == "RGB" for s in samples)
    assert len({s["key"] for s in samples}) == 14  # every unusual but valid image (2 records each) is read


def test_the_objective_decides_which_fields_a_record_needs(scraped):
    root, _, _ = scraped
    rows = [{"image": "scraped/good.png", "caption": "a red square"}, {"image": "scraped/good.png", **QA}]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {}
    for objective in ("qa", "caption", "mixed"):
        data = ImageTextDataset.from_jsonl(root / "mixed.jsonl", check=missing_fields(objective))
        counts[objective] = (len(data.records), dict(data.skipped.counts))
    assert counts == {
        "qa": (1, {"missing_question": 1}),
        "caption": (1, {"missing_caption": 1}),
        "mixed": (2, {}),
    }


def test_nothing_usable_is_refused_at_startup_with_the_counts(scraped, tmp_path):
    root, _, _ = scraped
    (root / "all_bad.jsonl").write_text('{"image": "scraped/good.png"}\n[1]\n{oops\n')
    with pytest.raises(ValueError, match=r"0 records.*missing_question.*bad_json"):
        train(
            config(root, tmp_path, root / "all_bad.jsonl"),
            build_task("vision", config(root, tmp_path, root / "all_bad.jsonl")),
        )
    (root / "no_image.jsonl").write_text(
        "".join(json.dumps({"image": "scraped/text.png", **QA}) + "\n" for _ in range(3))
    )
    with pytest.raises(ValueError, match=r"no readable image.*not_an_image 3"):
        train(
            config(root, tmp_path, root / "no_image.jsonl"),
            build_task("vision", config(root, tmp_path, root / "no_image.jsonl")),
        )
