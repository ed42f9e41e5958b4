"""`herd quickstart --modality speech`: speech recognition through a frozen LLM, on real synthesised speech.

Starts from `<out>/text_model` (the default quickstart's text stage; it runs first when missing), then:

1. synthesises a spoken dataset with eSpeak NG (`herd.data.synthetic.speech`, pip only): 2–5-word
   utterances over `QUICKSTART_WORDS` (33 words the text model knows: colours, shapes, numbers,
   positions), spoken by 8 voice variants at 3 rates and 3 pitches; the test split is spoken by 3 voice
   variants the training split never hears;
2. pretrains a tiny Conformer encoder with BEST-RQ on the training audio, transcripts unused
   (`herd train speech-encoder`, configs/quickstart_speech_encoder.toml);
3. trains that encoder and the speech adapter on the frozen LLM to transcribe, with the paper's ASR
   prompt "Repeat after me in English:" (`herd train speech`, configs/quickstart_speech.toml);
4. reports held-out word accuracy (1 − WER with jiwer's default normalisation) on the unseen voices, per
   voice, with examples, and checks that the frozen LLM's text-only logits did not change.

Results go to `<out>/quickstart_speech.json`, the model to `<out>/speech_model` (`herd ask --audio`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from herd.config import load_config
from herd.paths import config_path
from herd.quickstart import serve_hint

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITIONS = ("left", "right", "above", "below")
# Every word is in the text quickstart's corpus, so that the frozen LLM's trimmed vocabulary has it as one
# token and the LLM has a sense of it
QUICKSTART_WORDS: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *(s + "s" for s in SHAPES),
    *NUMBERS,
    *POSITIONS,
    "the",
    "is",
    "what",
    "plus",
)


def domain_phrases(n: int, rng: Any) -> list[str]:
    """`n` utterances of 2–5 words about the text corpus's world (shapes, colours, counts, positions,
    sums): "red circle", "three blue squares", "the green triangle is above", "what is four plus two",
    with every slot drawn uniformly, so the words vary freely within each phrase's shape."""

    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    def phrase() -> str:
        kind = int(rng.integers(5))
        if kind == 0:
            return f"{pick(COLOURS)} {pick(SHAPES)}"
        if kind == 1:
            return f"{pick(NUMBERS[2:])} {pick(COLOURS)} {pick(SHAPES)}s"
        if kind == 2:
            return f"the {pick(COLOURS)} {pick(SHAPES)} is {pick(POSITIONS)}"
        if kind == 3:
            return f"what is {pick(NUMBERS[:10])} plus {pick(NUMBERS[:10])}"
        return f"{pick(NUMBERS[2:])} {pick(SHAPES)}s {pick(POSITIONS)}"

    return [phrase() for _ in range(n)]


def word_accuracy(references: list[str], hypotheses: list[str]) -> float:
    """1 − WER over the whole set (jiwer's default normalisation; an empty hypothesis counts as deletions)."""
    import jiwer

    return 1.0 - jiwer.wer(references, [h if h.strip() else "<empty>" for h in hypotheses])


@torch.no_grad()
def transcribe(model: Any, task: Any, samples: list[dict[str, Any]], batch_size: int = 32) -> list[str]:
    """Greedy ASR of each sample's audio with the task's ASR prompt."""
    from herd.adapters.speech_llama import generate_with_audio
    from herd.speech.features import pad_features
    from herd.text.generation import SamplingParams

    model.eval()
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        feats = [task.features(s["audio"]) for s in chunk]
        prompts = [
            task.prompt_tokens(f"Repeat after me in {task.speech.language}:", task.audio_tokens(f.shape[0]))
            for f in feats
        ]
        features, lengths, _ = pad_features(feats)
        done = generate_with_audio(
            model, prompts, features, lengths, SamplingParams(max_new_tokens=12),
            stop_ids=task.tokenizer.stop_ids, pad_id=task.pad_id,
        )  # fmt: skip
        out += [task.tokenizer.decode(c.tokens).strip() for c in done]
    return out


@torch.no_grad()
def answer_spoken_sums(model: Any, task: Any, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spoken "what is four plus two" clips asked in the text corpus's own QA format, `Question: <audio>?
    Answer:`: the LLM knows every sum from its text stage, and was never trained on this with audio."""
    from herd.adapters.speech_llama import generate_with_audio
    from herd.speech.features import pad_features
    from herd.text.generation import SamplingParams

    if not samples:
        return []
    feats = [task.features(s["audio"]) for s in samples]
    prompts = [task.prompt_tokens("Question:", task.audio_tokens(f.shape[0]), "? Answer:") for f in feats]
    features, lengths, _ = pad_features(feats)
    done = generate_with_audio(
        model, prompts, features, lengths, SamplingParams(max_new_tokens=4),
        stop_ids=task.tokenizer.stop_ids, pad_id=task.pad_id,
    )  # fmt: skip
    out = []
    for s, c in zip(samples, done):
        a, b = (NUMBERS.index(w) for w in s["text"].split()[2::2])
        reply = task.tokenizer.decode(c.tokens).strip()
        out.append({"question": s["text"], "voice": s["voice"], "reply": reply, "expected": str(a + b),
                    "correct": reply.split(".")[0].strip() == str(a + b)})  # fmt: skip
    return out


def run_speech_quickstart(
    out: str | Path = "runs/quickstart",
    overrides: list[str] | None = None,
    n_train: int = 3000,
    n_test: int = 200,
    seed: int = 0,
    pretrain_steps: int | None = None,
) -> dict[str, Any]:
    """The speech quickstart (module docstring); `pretrain_steps` 0 skips BEST-RQ (the ablation)."""
    from herd.data.synthetic.speech import HELD_OUT_VOICES, write_speech_dataset
    from herd.tasks.speech import SpeechTask
    from herd.tasks.speech_encoder import SpeechEncoderTask
    from herd.text.loading import load_model
    from herd.trainer import train

    console = Console(stderr=True)
    start = time.perf_counter()
    out = Path(out)
    llm_dir = out / "text_model"
    if not (llm_dir / "params.json").is_file():
        from herd.quickstart import run_text_stage

        console.print(f"{llm_dir} is missing: running the quickstart's text stage first")
        run_text_stage(out, None, None, console)
    data = out / "speech"
    console.rule("[bold]herd quickstart · speech: BEST-RQ encoder, then the adapter on the frozen LLM")
    t0 = time.perf_counter()
    manifests = write_speech_dataset(
        data, n_train, n_test, seed=seed, words=QUICKSTART_WORDS, sentences=domain_phrases
    )
    synth_seconds = time.perf_counter() - t0
    console.print(f"{n_train} + {n_test} utterances synthesised with eSpeak NG in {synth_seconds:.0f} s")

    # stage 1: BEST-RQ on the training audio (the transcripts are not used)
    enc_cfg = load_config(
        config_path("quickstart_speech_encoder.toml"),
        [f"--speech.train_manifest={manifests['train']}", f"--train.run_dir={out / 'speech_encoder'}",
         f"--data.seed={seed}", *([f"--train.steps={pretrain_steps}"] if pretrain_steps else [])],
    )  # fmt: skip
    pretrain: dict[str, Any] = {"steps": 0}
    encoder_dir = None
    if pretrain_steps != 0:
        enc_task = SpeechEncoderTask.from_config(enc_cfg)
        enc_result = train(enc_cfg, enc_task)
        encoder_dir = enc_task.export(enc_result.runtime.full_state_dict(), out / "speech_encoder" / "model")
        pretrain = {"steps": enc_result.steps, "final_loss": enc_result.final_loss,
                    "train_seconds": enc_result.seconds}  # fmt: skip

    # stage 2: encoder + adapter on the frozen LLM, ASR
    cfg = load_config(
        config_path("quickstart_speech.toml"),
        [f"--speech.llm={llm_dir}", f"--speech.train_manifest={manifests['train']}",
         f"--train.run_dir={out / 'speech_sft'}", f"--data.seed={seed}",
         *([f"--speech.init_encoder={encoder_dir}"] if encoder_dir else []), *(overrides or [])],
    )  # fmt: skip
    task = SpeechTask.from_config(cfg)
    result = train(cfg, task)
    model = result.model.eval()
    llm = load_model(llm_dir)
    probe = torch.tensor([task.tokenizer.encode("The red circle is left of the", bos=True)])
    text_only_unchanged = bool(torch.equal(model(probe), llm(probe)))

    test = _read_split(task, manifests["test"])
    hypotheses = transcribe(model, task, test)
    references = [s["text"] for s in test]
    per_voice = {
        v: word_accuracy([r for r, s in zip(references, test) if s["voice"] == v],
                         [h for h, s in zip(hypotheses, test) if s["voice"] == v])
        for v in HELD_OUT_VOICES if any(s["voice"] == v for s in test)
    }  # fmt: skip
    sums = answer_spoken_sums(model, task, [s for s in test if s["text"].startswith("what is")][:6])
    model_dir = task.export(model.state_dict(), out / "speech_model")
    report = {
        "word_accuracy": word_accuracy(references, hypotheses),
        "word_accuracy_per_voice": per_voice,
        "sentence_accuracy": sum(r == h for r, h in zip(references, hypotheses)) / len(test),
        # the first word alone: what the clip's last adapter frame tells the LLM directly (docs/speech.md)
        "first_word_accuracy": sum(r.split()[:1] == h.split()[:1] for r, h in zip(references, hypotheses))
        / len(test),
        "text_only_unchanged": text_only_unchanged,
        "seconds": time.perf_counter() - start,
        "speech": {
            "seed": seed, "n_train": n_train, "n_test": n_test, "vocabulary": len(QUICKSTART_WORDS),
            "synthesis_seconds": synth_seconds, "pretraining": pretrain,
            "train_seconds": result.seconds, "final_train_loss": result.final_loss, "steps": result.steps,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "model_dir": str(model_dir),
            "spoken_questions": sums,
            "examples": [{"audio": s["key"], "voice": s["voice"], "expected": r, "heard": h}
                         for s, r, h in zip(test[:8], references[:8], hypotheses[:8])],
        },
    }  # fmt: skip
    (out / "quickstart_speech.json").write_text(json.dumps(report, indent=2) + "\n")
    print_speech_summary(report, console)
    return report


def _read_split(task: Any, manifest: Path) -> list[dict[str, Any]]:
    from herd.data.training.audio import AudioDataset
    from herd.tasks.speech import check_speech_record

    data = AudioDataset.from_jsonl(manifest, shuffle=False, loop=False, check=check_speech_record)
    return list(data)


def print_speech_summary(report: dict[str, Any], console: Console) -> None:
    table = Table(title="speech quickstart results (held-out voices)")
    table.add_column("")
    table.add_column("value")
    table.add_row("word accuracy (1 − WER)", f"{100 * report['word_accuracy']:.1f}%")
    for voice, acc in report["word_accuracy_per_voice"].items():
        table.add_row(f"  voice {voice}", f"{100 * acc:.1f}%")
    table.add_row("utterances transcribed exactly", f"{100 * report['sentence_accuracy']:.1f}%")
    table.add_row("first word right", f"{100 * report['first_word_accuracy']:.1f}%")
    table.add_row("frozen LLM's text-only logits unchanged", str(report["text_only_unchanged"]))
    table.add_row("total time", f"{report['seconds']:.0f} s")
    Console().print(table)
    for ex in report["speech"]["examples"][:4]:
        console.print(f"  [{ex['voice']}] said {ex['expected']!r} → heard {ex['heard']!r}")
    for q in report["speech"]["spoken_questions"][:3]:
        console.print(
            f"  [{q['voice']}] asked {q['question']!r} → {q['reply']!r} (the sum is {q['expected']})"
        )
    console.print(f"wrote {report['speech']['model_dir']}; try:")
    console.print(f"  herd ask --model {report['speech']['model_dir']} --audio <a .wav>")
    console.print(serve_hint(report["speech"]["model_dir"]))
