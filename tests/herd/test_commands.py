"""The one command registry (`herd.commands`) and its error contract: bad input is one line naming the
file, exit status 2, never a traceback; HERD_DEBUG=1 and real bugs keep the traceback."""

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import herd.commands.inference as inference
from herd.cli import main
from herd.commands import build_parser, command_names
from herd.commands.common import describe, is_bad_input
from herd.config import ConfigError
from herd.task import TASKS

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = "configs/text/tiny.toml"


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width × height RGB pixels (no real pixel data): PIL checks the size
    against Image.MAX_IMAGE_PIXELS when it opens the file, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_every_command_is_registered_once_under_one_scheme():
    assert command_names() == [
        "quickstart", "train", "generate", "chat", "guard", "ask", "serve",
        "post sample", "post gatt", "post average", "post dpo-reference",
        "data tokenize", "data dedup-images", "data dedup-text", "data filter-text", "data filter-clip",
        "data resample", "data filter-videos", "data curate-sft",
        "convert", "plan",
        "eval lm", "eval robustness", "eval contamination", "eval vqa", "eval video-qa", "eval asr", "eval reward",
        "quantize fp8",
    ]  # fmt: skip
    train = build_parser().parse_args(["train", "ppo", "--config", "x.toml"])
    assert train.task == "ppo" and train.func.__name__ == "cmd_train"
    choices = next(a.choices for a in train.command_parser._actions if a.dest == "task")
    assert (
        list(choices)
        == list(TASKS)
        == ["text", "vision", "video", "sft", "rm", "dpo", "ppo", "speech-encoder", "speech"]
    )


def test_building_the_parser_imports_no_torch():
    """`herd --help`, `herd train --help` and every usage error build the whole parser: it must not
    import torch (1.5 s of the 4.3 s `herd --help` took before herd.text, herd.planner and the task
    registry became torch-free at import). A fresh interpreter, since this one has torch loaded."""
    code = (
        "import sys; from herd.commands import build_parser, command_names; "
        "names = command_names(build_parser()); "
        "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'faiss', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1) == [str(len(command_names())), "[]\n"]


def test_library_modules_hold_no_argparse():
    """Only herd/commands/ and herd/cli.py build parsers; every library module is argparse-free."""
    offenders = []
    for folder in ("herd", "text", "data", "vision", "speech", "adapters"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("herd/commands/") or rel == "herd/cli.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "import argparse" in text or "add_parser(" in text or "def main(" in text:
                offenders.append(rel)
    assert offenders == []


def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, the start of the one stderr line) for each command family."""
    missing, out = tmp / "missing", tmp / "out"
    bomb = write_png_header(tmp / "bomb.png", 100_000, 100_000)
    (tmp / "not_an_image.png").write_text("hello")
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "params.json").write_text("{broken")
    (tmp / "ckpt" / "consolidated.00.pth").write_bytes(b"")
    (tmp / "bad_value.toml").write_text('[model]\npreset = "llama3_8b"\n[data]\nseq_len = "long"\n')
    (tmp / "captions.jsonl").write_text('{"id": 1, "caption": "a red car"}\n')
    (tmp / "empty_dir").mkdir()
    return [
        (["train", "text", "--config", str(missing)], f"herd train: error: {missing}: config file not found"),
        (["train", "text", "--config", TINY_CONFIG, "--optimizer.lr=abc"],
         f"herd train: error: {TINY_CONFIG}: optimizer.lr: expected float, got 'abc'"),
        (["quickstart", "--config", str(missing)], f"herd quickstart: error: {missing}: config file not found"),
        (["generate", "--model", str(missing), "--prompt", "hi"], f"herd generate: error: {missing} does not exist"),
        (["chat", "--model", str(tmp / "ckpt"), "--message", "hi"],
         f"herd chat: error: {tmp / 'ckpt' / 'params.json'}: invalid JSON"),
        (["ask", "--model", str(missing), "--image", str(bomb), "--question", "q"],
         f"herd ask: error: {bomb}: image too large to decode safely: Image size (10000000000 pixels) exceeds"),
        (["ask", "--model", str(missing), "--image", str(tmp / "not_an_image.png"), "--question", "q"],
         f"herd ask: error: {tmp / 'not_an_image.png'}: cannot read image"),
        (["ask", "--model", str(missing), "--image", str(missing), "--question", "q"],
         f"herd ask: error: {missing}: image file not found"),
        (["post", "sample", "--policy", "p", "--reward-model", "r", "--prompts", str(missing), "--out", str(out)],
         f"herd post sample: error: {missing}: prompts file not found"),
        (["post", "average", str(missing), str(tmp / "ckpt"), "--out", str(out)],
         f"herd post average: error: {missing} does not exist"),
        (["post", "gatt", "--model", "m", "--dialogs", str(missing), "--instructions", "i", "--out", str(out)],
         f"herd post gatt: error: {missing}: dialog file does not exist"),
        (["post", "dpo-reference", "--reference", str(tmp / "ckpt"), "in.jsonl", "out.jsonl"],
         f"herd post dpo-reference: error: {tmp / 'ckpt' / 'params.json'}: invalid JSON"),
        (["data", "tokenize", "--source", "jsonl", "--input", str(missing), "--out", str(out)],
         f"herd data tokenize: error: input path does not exist: {missing}"),
        (["data", "resample", "--captions", str(tmp / "captions.jsonl"), "--vocab-texts", str(missing),
          "--threshold", "3", "--out", str(out)], f"herd data resample: error: {missing}: No such file or directory"),
        (["convert", "--to", "hf", str(missing), str(out)], f"herd convert: error: {missing}: checkpoint not found"),
        (["convert", "--from", "dcp", "--to", "hf", str(tmp / "empty_dir"), str(out)],
         f"herd convert: error: {tmp / 'empty_dir'}: not a DCP checkpoint, nor a folder holding a complete one"),
        (["plan", "--config", str(tmp / "bad_value.toml"), "--gpus", "8"],
         f"herd plan: error: {tmp / 'bad_value.toml'}: data.seq_len: expected int, got 'long'"),
        (["plan", "--preset", "llama3_8b", "--gpus", "8", "--gpu-mem", "lots"],
         "herd plan: error: 'lots' is not a size (expected e.g. 80GB, 80GiB, 512MiB or 80)"),
    ]  # fmt: skip


def test_bad_input_is_one_line_naming_the_file_and_exit_status_2(tmp_path, capsys):
    for argv, expected in bad_input_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(expected), (argv, err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nope", "--config", "x.toml"], "herd train: error: argument task: invalid choice: 'nope'"),
        (["generate", "--model", "x", "--bogus", "1"], "herd generate: error: unrecognized arguments: --bogus 1"),
        (["data", "filter-text", "--input", "a", "--out", "o", "--dup-ngram", "5:x"],
         "herd data filter-text: error: argument --dup-ngram: expected n:max_coverage pairs like 5:0.15, got '5:x'"),
        (["data", "filter-text", "--input", "a", "--out", "o", "--max-kl", "1"],
         "herd data filter-text: error: --max-kl needs --reference-dist"),
        (["plan", "--preset", "llama3_8b", "--gpus", "8", "--train.steps=3"],
         "herd plan: error: --train.steps=3: config overrides need --config"),
        (["ask", "--model", "m", "--image", "a.png", "--image", "b.png", "--image", "c.png",
          "--question", "q1", "--question", "q2"], "herd ask: error: 2 --question for 3 --image"),
        (["post"], "herd post: error: the following arguments are required: COMMAND"),
    ],
)  # fmt: skip
def test_command_line_misuse_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_herd_debug_and_real_bugs_keep_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HERD_DEBUG", "1")
    with pytest.raises(ConfigError, match="config file not found"):
        main(["train", "text", "--config", str(tmp_path / "missing.toml")])
    monkeypatch.delenv("HERD_DEBUG")

    def buggy(args):
        raise TypeError("a bug, not bad input")

    monkeypatch.setattr(inference, "cmd_generate", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["generate", "--model", "x"])
    assert capsys.readouterr().err == ""


def test_describe_names_the_file():
    assert (
        describe(FileNotFoundError(2, "No such file or directory", "a.txt"))
        == "a.txt: No such file or directory"
    )
    assert describe(FileNotFoundError("shards/x.tar")) == "shards/x.tar: not found"
    assert describe(NotADirectoryError("images")) == "images: not a directory"
    assert describe(KeyError("lr")) == "missing key 'lr'"
    assert describe(KeyError("cfg.toml: no [model] table")) == "cfg.toml: no [model] table"
    assert is_bad_input(ImportError("this command needs faiss", name="faiss"))
    assert not is_bad_input(ImportError("no module", name="herd.nowhere"))  # herd's own import: a bug
    assert not is_bad_input(TypeError("x")) and is_bad_input(ConfigError("x"))


def test_decompression_bomb_through_the_console_script(tmp_path):
    bomb = write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    done = subprocess.run(
        [sys.executable, "-m", "herd", "ask", "--model", str(tmp_path), "--image", str(bomb), "--question", "q"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith(f"herd ask: error: {bomb}: image too large to decode safely")
    assert "decompression bomb" in lines[0]
