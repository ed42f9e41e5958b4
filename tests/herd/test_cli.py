"""The `herd` console script end to end: train → export → generate / chat; quickstart."""

import json
import subprocess
import sys

import pytest

from herd.cli import main
from herd.text.loading import load_pretrained

TINY = [
    "--model.vocab_subset=true",
    "--model.args.dim=64",
    "--model.args.n_layers=2",
    "--model.args.n_heads=4",
    "--model.args.n_kv_heads=2",
    "--data.synthetic_docs=600",
    "--data.seq_len=64",
    "--data.batch_size=8",
    "--metrics.tensorboard=false",
    "--metrics.log_every=10",
    "--optimizer.lr=3e-3",
    "--schedule.warmup_steps=5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    main(
        [
            "train",
            "text",
            "--config",
            "configs/text/tiny.toml",
            f"--train.run_dir={run}",
            "--train.steps=150",
            *TINY,
        ]
    )
    return run


def test_train_exports_a_checkpoint_load_pretrained_reads(trained):
    model, tokenizer = load_pretrained(trained / "model")
    assert model.args.n_layers == 2 and tokenizer.vocab_size <= model.args.vocab_size < 1000
    assert model.args.vocab_size % 64 == 0
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 150


def test_generate_command(trained, capsys):
    main(
        [
            "generate",
            "--model",
            str(trained / "model"),
            "--prompt",
            "Count: one two",
            "--prompt",
            "The red",
            "--max-new-tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Count: one two three")  # 150 steps suffice to learn counting
    assert out[1].startswith("The red")


def test_chat_command_runs_scripted_turns(trained, capsys):
    main(
        [
            "chat",
            "--model",
            str(trained / "model"),
            "--system",
            "be brief",
            "--message",
            "hi",
            "--message",
            "again",
            "--max-new-tokens",
            "4",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("assistant: ") for line in out)


def test_unknown_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "--bogus", "1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_quickstart_writes_its_report(tmp_path):
    report = main(
        ["quickstart", "--out", str(tmp_path), "--train.steps=30", "--data.synthetic_docs=600",
         "--metrics.tensorboard=false", "--vision-steps", "4"]
    )  # fmt: skip
    assert report == 0
    data = json.loads((tmp_path / "quickstart.json").read_text())
    assert set(data["text"]) >= {
        "final_train_loss",
        "val_loss",
        "arithmetic_accuracy",
        "samples",
        "model_dir",
    }
    assert 0.0 <= data["text"]["arithmetic_accuracy"] <= 1.0 and data["seconds"] > 0
    assert (tmp_path / "text_model" / "params.json").is_file()
    # the vision stage: per-type accuracy beside chance, the frozen-LLM check, a checkpoint `herd ask` loads
    assert set(data["accuracy"]) == {"color", "shape", "count", "position"} == set(data["chance"])
    assert data["text_only_unchanged"] is True
    assert (tmp_path / "examples.png").is_file()
    main(["ask", "--model", data["vision"]["model_dir"], "--image", str(tmp_path / "shapes/images/val/000000.png"),
          "--question", "How many shapes are there?", "--max-new-tokens", "3"])  # fmt: skip


def test_python_dash_m_herd_help():
    out = subprocess.run(
        [sys.executable, "-m", "herd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("quickstart", "train", "convert", "generate", "chat"):
        assert command in out
