"""`herd train speech-encoder`: BEST-RQ through the one training loop — it learns (below a context-free
baseline on held-out audio), FSDP equals one process, bad audio is counted, the export loads."""

import json
import math

import pytest
import torch
from speech_inputs import write_bad_audio_files

from herd.config import ConfigError, load_config
from herd.data.synthetic.tones import write_tone_manifest
from herd.parallel.launch import spawn_ranks
from herd.paths import config_path
from herd.speech.encoder_io import load_speech_encoder
from herd.task import LayoutNotSupported, build_task, task_class
from herd.trainer import train, train_and_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = config_path("speech/bestrq_tiny.toml")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    return write_tone_manifest(root / "train", 48, seed=0), write_tone_manifest(root / "val", 16, seed=1)


def overrides(manifest, run_dir, *extra):
    return [
        f"--speech.train_manifest={manifest}", f"--train.run_dir={run_dir}", "--metrics.log_every=1",
        "--train.eval_every=0", "--checkpoint.save_final=false", "--checkpoint.resume=none", *extra,
    ]  # fmt: skip


def run_speech(manifest, run_dir, extra):
    cfg = load_config(CONFIG, overrides(manifest, run_dir, *extra))
    result = train(cfg, build_task("speech-encoder", cfg), show_progress=False)
    return [(h["loss"], h["grad_norm"]) for h in result.history]


def init_model(task, seed):
    """The model as the loop starts it on one process."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.to_empty(device="cpu")
    task.plan.init_buffers(model)
    task.init_weights(model)
    return model


@torch.no_grad()
def val_loss_and_baseline(task, model):
    """(mean masked-prediction loss on the validation manifest, the loss of the best context-free
    predictor: each codebook's code frequencies over 30 training batches, add-one smoothed)."""
    C, V = task.bestrq_args.num_codebooks, task.bestrq_args.codebook_size
    counts = torch.ones(C, V)
    batches = task.train_batches(0, 1)
    for _ in range(30):
        b = next(batches)
        _, targets = model(*task.inputs(b)[0])
        counts += torch.stack([torch.bincount(targets[:, c], minlength=V) for c in range(C)])
    log_q = (counts / counts.sum(1, keepdim=True)).log()  # (C, V)
    loss = baseline = 0.0
    n = 0
    for b in task.val_batches():
        out = task.loss(model, b)
        _, targets = model(*task.inputs(b)[0])
        loss += float(out.loss_sum)
        baseline += float(-log_q.gather(1, targets.T).mean(0).sum())
        n += out.num_targets
    return loss / n, baseline / n


def test_a_short_run_lowers_the_masked_prediction_loss(tones, tmp_path):
    train_manifest, val_manifest = tones
    cfg = load_config(CONFIG, overrides(train_manifest, tmp_path, "--train.steps=200", "--metrics.log_every=20",
                                        f"--speech.val_manifest={val_manifest}"))  # fmt: skip
    task = build_task("speech-encoder", cfg)
    start_val, baseline = val_loss_and_baseline(task, init_model(task, cfg.train.seed))
    assert start_val == pytest.approx(math.log(256), abs=0.15)  # chance: ln V
    result = train(cfg, task, show_progress=False)
    losses = [h["loss"] for h in result.history]
    end_val, _ = val_loss_and_baseline(task, result.model)
    print(
        f"BEST-RQ tiny, 200 steps: train loss {losses[0]:.3f} (steps 1-20) → {losses[-1]:.3f} (181-200); "
        f"held-out {start_val:.3f} → {end_val:.3f}; context-free baseline {baseline:.3f}; "
        f"code accuracy {result.history[-1]['code_accuracy']:.3f}"
    )
    assert losses[-1] < losses[0] - 1.0
    # below what the code frequencies alone give: the encoder predicts masked frames from their context
    assert end_val < baseline - 0.15, (end_val, baseline)
    assert result.history[-1]["code_accuracy"] > 0.1 > 2 / 256


@pytest.mark.multiprocess
def test_fsdp_matches_single_process(tones, tmp_path):
    single = run_speech(tones[0], tmp_path / "a", ["--train.steps=3"])
    fsdp = spawn_ranks(run_speech, 2, tones[0], tmp_path / "b", ["--train.steps=3", "--parallel.dp_shard=2"])[
        0
    ]
    assert len(single) == len(fsdp) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(single, fsdp):
        assert abs(loss_a - loss_b) < 1e-4 and abs(norm_a - norm_b) < 1e-4 * max(1.0, norm_a), (single, fsdp)


def test_bad_audio_is_skipped_and_counted_through_the_task(tones, tmp_path):
    bad = write_bad_audio_files(tmp_path / "bad")
    lines = [json.dumps({"audio": str(tones[0].parent / f"clips/{i:06d}.wav")}) for i in range(6)]
    lines += [json.dumps({"audio": path}) for path in bad] + ["not json", json.dumps({"transcript": "hi"})]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = load_config(
        CONFIG, overrides(manifest, tmp_path / "run", "--train.steps=3", "--speech.max_seconds=2.0")
    )
    result = train(cfg, build_task("speech-encoder", cfg), show_progress=False)
    assert result.skipped["train"] == {"bad_json": 1, "no_audio_field": 1, **{r: 1 for r in bad.values()}}
    assert result.history[-1]["skipped/train/not_audio"] == 1.0  # logged by the loop


def test_export_writes_the_encoder_that_load_reads(tones, tmp_path):
    result, out = train_and_export(
        "speech-encoder",
        CONFIG,
        overrides(tones[0], tmp_path, "--train.steps=2") + ["--checkpoint.export_format=meta"],
    )
    assert out == tmp_path / "model" and (out / "encoder.safetensors").is_file()
    encoder = load_speech_encoder(out)
    config = json.loads((out / "speech_encoder.json").read_text())
    assert config["pretraining"]["objective"] == "bestrq" and config["features"]["n_mels"] == 80
    feats, lengths = torch.randn(2, 50, 80), torch.tensor([50, 31])
    with torch.no_grad():
        want = result.model.encoder.eval()(feats, lengths)
        got = encoder(feats, lengths)
    assert torch.equal(got, want)
    (out / "speech_encoder.json").write_text("{")
    with pytest.raises(ValueError, match="speech_encoder.json: not valid JSON"):
        load_speech_encoder(out)


def test_config_section_layouts_and_the_papers_sizes(tones, tmp_path):
    assert task_class("speech-encoder").sections == ("speech", "data")
    with pytest.raises(ConfigError, match=r"speech.encoder: 'whisper' is not one of speech_1b, tiny"):
        load_config(CONFIG, ["--speech.encoder=whisper"])
    with pytest.raises(ValueError, match="speech.train_manifest"):
        build_task("speech-encoder", load_config(CONFIG))
    with pytest.raises(LayoutNotSupported, match="tensor parallelism"):
        build_task("speech-encoder", load_config(CONFIG, overrides(tones[0], tmp_path, "--parallel.tp=2")))
    # the paper's pretraining model: the 1,002,100,224-parameter encoder + 16 heads of 8192 codes
    cfg = load_config(None, [f"--speech.train_manifest={tones[0]}", "--speech.encoder=speech_1b"])
    task = build_task("speech-encoder", cfg)
    assert (cfg.speech.num_codebooks, cfg.speech.codebook_size, cfg.speech.code_dim) == (16, 8192, 16)
    assert (cfg.speech.mask_prob, cfg.speech.mask_span, cfg.speech.crop_frames) == (0.025, 32, 6000)
    assert task.model_args.num_params() == 1_002_100_224 + 16 * 8192 * (1536 + 1)
    model = task.build_model()  # meta: nothing allocated
    assert sum(p.numel() for p in model.parameters()) == task.model_args.num_params()
    assert task.plan.fsdp_units(model)[-1] == "heads" and len(task.plan.checkpoint_units(model)) == 24
    # ~6 FLOPs per weight and frame, 1 / 0.555 frames per masked frame, plus the heads: ≈ 1.3e10
    assert 1.1e10 < task.flops_per_target() < 1.6e10


def test_the_cli_trains_and_a_resumed_run_continues_bit_exactly(tones, tmp_path):
    """`herd train speech-encoder` through the console script's main, checkpointing every 2 steps; a run
    resumed from step 2 gives steps 3 and 4 the same losses (data position, masks and noise included)."""
    from herd.cli import main
    from herd.metrics import read_metrics

    common = ["--train.steps=4", "--checkpoint.interval=2"]
    args = ["train", "speech-encoder", "--config", str(CONFIG), *overrides(tones[0], tmp_path / "a", *common)]
    assert main(args) == 0
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r and "split" not in r}
    assert sorted(full) == [1, 2, 3, 4] and (tmp_path / "a" / "model" / "encoder.safetensors").is_file()
    step2 = tmp_path / "a" / "checkpoints" / "step-00000002"
    resumed = run_speech(tones[0], tmp_path / "b", [*common, f"--checkpoint.resume={step2}"])
    assert [loss for loss, _ in resumed] == [full[3], full[4]]


def test_activation_checkpointing_of_the_plans_blocks_changes_no_number(tones, tmp_path):
    plain = run_speech(tones[0], tmp_path / "a", ["--train.steps=2"])
    checkpointed = run_speech(
        tones[0], tmp_path / "b", ["--train.steps=2", "--parallel.activation_checkpoint=full"]
    )
    assert len(plain) == len(checkpointed) == 2
    assert all(abs(a - b) < 1e-6 and abs(ga - gb) < 1e-6 for (a, ga), (b, gb) in zip(plain, checkpointed))
    ac = ["--train.steps=1", "--parallel.activation_checkpoint=full"]
    cfg = load_config(CONFIG, overrides(tones[0], tmp_path / "c", *ac))
    wrapped = train(cfg, build_task("speech-encoder", cfg), show_progress=False).model.encoder.layers
    assert [type(m).__name__ for m in wrapped] == ["CheckpointWrapper"] * 2  # the plan's units, wrapped
