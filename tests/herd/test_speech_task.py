"""`herd train speech`: the speech adapter and encoder on a frozen LLM through the one training loop — only
they train, prompts and labels follow the paper's tasks, bad records are counted, FSDP and TP match one
process, a BEST-RQ encoder is the starting point when given, and the export answers `herd ask --audio`."""

import hashlib
import json

import pytest
import torch
from speech_workspace import write_speech_workspace

from herd.adapters.speech_io import load_speech_model
from herd.cli import main
from herd.config import load_config
from herd.parallel.launch import spawn_ranks
from herd.paths import config_path
from herd.quickstart_speech import transcribe, word_accuracy
from herd.speech.encoder_io import load_speech_encoder
from herd.task import LayoutNotSupported
from herd.tasks.speech import SpeechTask, spec_augment
from herd.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = config_path("speech/sft_tiny.toml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_speech_workspace(tmp_path_factory.mktemp("speech"), 16, 4)


def overrides(root, run_dir, *extra):
    return [
        f"--speech.llm={root / 'llm'}", f"--speech.train_manifest={root / 'speech' / 'train.jsonl'}",
        f"--speech.val_manifest={root / 'speech' / 'test.jsonl'}", f"--train.run_dir={run_dir}",
        "--data.batch_size=4", "--metrics.log_every=1", "--train.eval_every=0", "--metrics.tensorboard=false",
        "--checkpoint.save_final=false", "--checkpoint.resume=none", "--schedule.warmup_steps=1", *extra,
    ]  # fmt: skip


def run_speech(root, run_dir, extra):
    cfg = load_config(CONFIG, overrides(root, run_dir, *extra))
    result = train(cfg, SpeechTask.from_config(cfg), show_progress=False)
    return [h["loss"] for h in result.history], [h["grad_norm"] for h in result.history]


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_only_encoder_and_adapter_train_and_the_export_answers(setup, tmp_path, capsys):
    cfg = load_config(CONFIG, overrides(setup, tmp_path, "--train.steps=5", "--optimizer.lr=3e-3"))
    task = SpeechTask.from_config(cfg)
    from herd.text.loading import load_model

    llm = load_model(setup / "llm")
    result = train(cfg, task, show_progress=False)
    model = result.model.eval()
    assert digest(model.llm) == digest(llm)  # the LLM never moved
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "adapter"}
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 5 and losses[-1] < losses[0]
    out = task.export(model.state_dict(), tmp_path / "speech_model")
    loaded, _, config = load_speech_model(out)
    assert config["llm"] == str((setup / "llm").resolve())
    test = list(task.dataset("val", loop=False))
    batch = task.encode(test[:3])
    args, kwargs = task.inputs(batch)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs), model(*args, **kwargs))
    heard = transcribe(loaded, task, test)
    assert len(heard) == len(test) and -10 < word_accuracy([s["text"] for s in test], heard) <= 1
    # `herd ask --audio`: two clips in one batch are transcribed as `transcribe` did
    clips = [setup / "speech" / f"clips/test_00000{i}.wav" for i in range(2)]
    assert (
        main(
            [
                "ask",
                "--model",
                str(out),
                "--audio",
                str(clips[0]),
                "--audio",
                str(clips[1]),
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == heard[:2]
    assert lines[0].split("\t")[1] == "Repeat after me in English:"
    assert main(["ask", "--model", str(out), "--audio", str(setup / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_prompts_and_labels_follow_the_papers_tasks(setup, tmp_path):
    task = SpeechTask.from_config(load_config(CONFIG, overrides(setup, tmp_path)))
    tok = task.tokenizer
    audio = torch.zeros(16000)  # 1 s: 98 log-mel frames → 25 encoder frames → 13 adapter frames
    samples = [
        {"audio": audio, "text": "red blue"},
        {"audio": audio, "text": "ignored", "translation": "green red"},
        {"audio": audio, "response": "blue", "prompt": "Question:", "prompt_after": " Answer:"},
    ]
    batch = task.encode(samples)
    n = task.audio_tokens(98)
    assert n == 13 and (batch["tokens"] == task.audio_id).sum(1).tolist() == [13, 13, 13]
    heads = [
        tok.encode("Repeat after me in English:"),
        tok.encode("Translate the following sentence into English:"),
        tok.encode("Question:"),
    ]
    targets = [" red blue", " green red", " blue"]
    for row, (head, target) in enumerate(zip(heads, targets)):
        after = tok.encode(" Answer:") if row == 2 else []
        prompt = [tok.bos_id, *head, *[task.audio_id] * n, *after]
        tail = [*tok.encode(target), task.eot_id]
        seq = (prompt + tail)[:-1]
        assert batch["tokens"][row, : len(seq)].tolist() == seq
        labels = batch["labels"][row].tolist()
        assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
        assert labels[len(prompt) - 1 : len(prompt) - 1 + len(tail)] == tail
    assert batch["audio_lengths"].tolist() == [98, 98, 98]


def test_bad_records_are_skipped_and_counted(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.loads((setup / "speech" / "train.jsonl").read_text().splitlines()[0])
    good["audio"] = str(setup / "speech" / good["audio"])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF? not really" * 64)
    lines = [json.dumps(good), json.dumps({"audio": good["audio"]}), json.dumps({"text": "red"}),
             json.dumps({"audio": "garbage.wav", "text": "red"}), json.dumps({"audio": "nope.wav", "text": "red"}),
             "{not json"]  # fmt: skip
    bad.write_text("\n".join(lines) + "\n")
    task = SpeechTask.from_config(
        load_config(CONFIG, overrides(setup, tmp_path, f"--speech.train_manifest={bad}"))
    )
    data = task.dataset("train", loop=False)
    samples = list(data)  # every round yields a sample: a bad file's round takes the next usable record
    assert len(samples) == 3 and {s["text"] for s in samples} == {good["text"]}
    assert dict(data.skipped.counts) == {
        "missing_text": 1, "no_audio_field": 1, "not_audio": 1, "missing_file": 1, "bad_json": 1,
    }  # fmt: skip


def test_a_pretrained_encoder_is_the_starting_point_and_can_stay_frozen(setup, tmp_path):
    from herd.tasks.speech_encoder import SpeechEncoderTask

    enc_cfg = load_config(
        config_path("speech/bestrq_tiny.toml"),
        [f"--speech.train_manifest={setup / 'speech' / 'train.jsonl'}", f"--train.run_dir={tmp_path / 'enc'}",
         "--train.steps=1", "--data.batch_size=4", "--metrics.tensorboard=false"],
    )  # fmt: skip
    enc_task = SpeechEncoderTask.from_config(enc_cfg)
    result = train(enc_cfg, enc_task, show_progress=False)
    enc_dir = enc_task.export(result.runtime.full_state_dict(), tmp_path / "encoder")
    cfg = load_config(
        CONFIG,
        overrides(setup, tmp_path / "sft", f"--speech.init_encoder={enc_dir}", "--speech.trainable=adapter",
                  "--train.steps=2"),
    )  # fmt: skip
    task = SpeechTask.from_config(cfg)
    model = train(cfg, task, show_progress=False).model
    assert digest(model.encoder) == digest(load_speech_encoder(enc_dir))  # loaded, then frozen
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"adapter"}
    with pytest.raises(ValueError, match="both set"):
        SpeechTask.from_config(
            load_config(
                CONFIG,
                overrides(
                    setup, tmp_path, f"--speech.init_encoder={enc_dir}", "--speech.encoder_args={dim = 32}"
                ),
            )  # fmt: skip
        )


def test_bad_config_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="speech.llm"):
        SpeechTask.from_config(load_config(CONFIG, overrides(setup, tmp_path, "--speech.llm=")))
    task = SpeechTask.from_config(load_config(CONFIG, overrides(setup, tmp_path)))
    with pytest.raises(LayoutNotSupported, match="pipeline"):
        task.check_layout({"pp": 2})


def test_spec_augment_is_seeded_and_bounded():
    feats = torch.randn(200, 80)
    a = spec_augment(feats, torch.Generator().manual_seed(3))
    b = spec_augment(feats, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, feats)
    zero_channels = int((a == 0).all(0).sum())
    zero_frames = int((a == 0).all(1).sum())
    assert zero_channels <= 20 and zero_frames <= 2 * 10  # two masks of ≤ 10 channels, ≤ 5 % of 200 frames
    changed = a != feats
    assert bool((a[changed] == 0).all())  # a masked value is the normalised mean, 0
    in_a_mask = (a == 0).all(1)[:, None] | (a == 0).all(0)[None, :]  # whole frames or whole channels
    assert bool((changed <= in_a_mask).all())


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.tp=2"]], ids=["fsdp", "tp"])
def test_parallel_layouts_match_single_process(setup, tmp_path, layout):
    single = run_speech(setup, tmp_path / "a", ["--train.steps=3"])
    multi = spawn_ranks(run_speech, 2, setup, tmp_path / "b", ["--train.steps=3", *layout])[0]
    assert multi[0] == pytest.approx(single[0], abs=1e-5)  # losses
    assert multi[1] == pytest.approx(single[1], abs=1e-4)  # grad norms


def test_the_speech_quickstart_runs_end_to_end_at_a_tiny_size(setup, tmp_path):
    from herd.quickstart_speech import run_speech_quickstart

    (tmp_path / "text_model").symlink_to(setup / "llm")  # the text stage's model, as the quickstart reuses it
    report = run_speech_quickstart(
        tmp_path, ["--train.steps=2", "--data.batch_size=4", "--metrics.tensorboard=false"], n_train=12,
        n_test=8, pretrain_steps=2,
    )  # fmt: skip
    saved = json.loads((tmp_path / "quickstart_speech.json").read_text())
    assert saved["word_accuracy"] == report["word_accuracy"] <= 1.0
    assert set(saved["word_accuracy_per_voice"]) <= {"en-us+m7", "en+f5", "en-gb-x-rp+m6"}
    assert saved["text_only_unchanged"] is True
    assert saved["speech"]["pretraining"]["steps"] == 2 and saved["speech"]["steps"] == 2
    assert all(q["question"].startswith("what is") for q in saved["speech"]["spoken_questions"])
    loaded, _, config = load_speech_model(tmp_path / "speech_model")
    assert config["encoder_args"].dim == 96  # the quickstart's encoder, from its BEST-RQ export
