"""The video task through the one training loop: only the video adapter trains, a video model built from
an image checkpoint answers exactly as the image model did on text and images, FSDP and TP match one
process, and the exported model answers `herd ask --video`."""

import hashlib
import json

import pytest
import torch
from tiny_workspaces import write_video_workspace

from herd.adapters.multimodal_io import load_multimodal_model, load_video_model_from_image
from herd.adapters.perceiver import get_perceiver_preset
from herd.cli import main
from herd.config import load_config
from herd.parallel.launch import spawn_ranks
from herd.quickstart_video import evaluate_video_qa, shuffled
from herd.tasks.video import VideoTask
from herd.trainer import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_video_workspace(tmp_path_factory.mktemp("video"), 24, 6)


def overrides(root, run_dir, *extra):
    return [
        f"--video.init_from={root / 'image_model'}", f"--video.train_manifest={root / 'videos' / 'train.jsonl'}",
        f"--video.val_manifest={root / 'videos' / 'val.jsonl'}", "--video.num_frames=4", "--video.video_every=2",
        "--video.perceiver_args={frames_per_group = 4, max_groups = 2, n_latents = 4}",
        f"--train.run_dir={run_dir}", "--data.batch_size=4", "--metrics.log_every=1", "--train.eval_every=0",
        "--metrics.tensorboard=false", "--checkpoint.save_final=false", "--checkpoint.resume=none",
        "--train.device=cpu", "--optimizer.lr=3e-3", "--schedule.warmup_steps=1", *extra,
    ]  # fmt: skip


def run_video(root, run_dir, extra):
    cfg = load_config(None, overrides(root, run_dir, *extra))
    result = train(cfg, VideoTask.from_config(cfg), show_progress=False)
    return [h["loss"] for h in result.history], [h["grad_norm"] for h in result.history]


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_only_the_video_adapter_trains_and_the_export_loads(setup, tmp_path, capsys):
    cfg = load_config(None, overrides(setup, tmp_path, "--train.steps=6"))
    task = VideoTask.from_config(cfg)
    assert task.video_layers == [0, 2]  # image layers 0, 1, 2: every 2nd counted back from the last
    image_model, _, _ = load_multimodal_model(setup / "image_model")
    frozen = {
        name: digest(getattr(image_model, name)) for name in ("llm", "vision", "projector", "cross_attention")
    }
    result = train(cfg, task, show_progress=False)
    model = result.model
    assert {name: digest(getattr(model, name)) for name in frozen} == frozen  # nothing but video moved
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("video.") for n in trainable)
    assert all(abs(b.gate_attn.item()) > 0 for b in model.video.cross_attention.values())
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    out = task.export(model.state_dict(), tmp_path / "video_model")
    config = json.loads((out / "vision.json").read_text())
    assert config["video"]["num_frames"] == 4 and config["video"]["cross_attention_layers"] == [0, 2]
    loaded, _, _ = load_multimodal_model(out)
    val = list(task.dataset("val", loop=False))
    batch = task.encode(val[:3])
    args, kwargs = task.inputs(batch)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs), model.eval()(*args, **kwargs))
    report = evaluate_video_qa(loaded, task, val)
    assert len(report["answers"]) == len(val) and set(report["accuracy"]) <= {"direction", "order", "shape"}
    # `herd ask --video`: two clips in one batch give the answers the evaluation gave them
    clips = [setup / "videos" / "videos" / "val" / f"00000{i}.mp4" for i in range(2)]
    argv = [
        "ask",
        "--model",
        str(out),
        "--max-new-tokens",
        "8",
        "--question",
        val[0]["question"],
        "--question",
        val[1]["question"],
    ]
    assert main([*argv, *(a for c in clips for a in ("--video", str(c)))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == [a.strip() for a in report["answers"][:2]]
    with pytest.raises(SystemExit) as usage:  # neither --image nor --video: a usage error, status 2
        main(["ask", "--model", str(out), "--question", "q"])
    assert usage.value.code != 0 and "--video" in str(usage.value)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    assert main(["ask", "--model", str(out), "--video", str(bad), "--question", "q"]) == 2
    assert str(bad) in capsys.readouterr().err  # one line naming the file


def test_a_video_model_from_an_image_checkpoint_answers_exactly_as_the_image_model(setup):
    image_model, tok, _ = load_multimodal_model(setup / "image_model")
    video_model, _, _ = load_video_model_from_image(
        setup / "image_model", get_perceiver_preset("tiny", dim=64), 1
    )
    assert len(video_model.video.cross_attention) == 3
    tokens = torch.tensor([[tok.bos_id, 64, *tok.encode("What shape is the red object?")]])
    pixels = torch.rand(1, 1, 1, 3, 56, 56)
    images = {"pixel_values": pixels, "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.long),
              "aspect_ratio_mask": torch.ones(1, 1, 1, dtype=torch.long)}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(video_model(tokens[:, 2:]), image_model(tokens[:, 2:]))  # text only
        assert torch.equal(video_model(tokens, **images), image_model(tokens, **images))  # with an image
        # with a video too, the zero gates add exactly nothing
        video = {"video_pixel_values": torch.rand(1, 4, 1, 3, 56, 56),
                 "video_aspect_ratio_ids": torch.ones(1, 4, dtype=torch.long),
                 "video_aspect_ratio_mask": torch.ones(1, 4, 1, dtype=torch.long)}  # fmt: skip
        assert torch.equal(video_model(tokens, **images, **video), image_model(tokens, **images))


def test_shuffled_frames_keep_the_frame_set(setup, tmp_path):
    cfg = load_config(None, overrides(setup, tmp_path))
    task = VideoTask.from_config(cfg)
    clip = next(iter(task.dataset("val", loop=False)))["video"]
    mixed = shuffled(clip, 3)
    assert not torch.equal(mixed.frames, clip.frames)
    as_set = lambda f: sorted(hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in f)  # noqa: E731
    assert as_set(mixed.frames) == as_set(clip.frames)


def test_bad_config_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        VideoTask.from_config(load_config(None, overrides(setup, tmp_path, "--video.init_from=")))
    with pytest.raises(ValueError, match="groups"):
        VideoTask.from_config(load_config(None, overrides(setup, tmp_path, "--video.num_frames=12")))
    with pytest.raises(ValueError, match="perceiver"):
        VideoTask.from_config(load_config(None, overrides(setup, tmp_path, "--video.perceiver=huge")))


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.tp=2"]], ids=["fsdp", "tp"])
def test_parallel_layouts_match_single_process(setup, tmp_path, layout):
    single = run_video(setup, tmp_path / "a", ["--train.steps=3"])
    multi = spawn_ranks(run_video, 2, setup, tmp_path / "b", ["--train.steps=3", *layout])[0]
    assert multi[0] == pytest.approx(single[0], abs=1e-5)  # losses
    assert multi[1] == pytest.approx(single[1], abs=1e-4)  # grad norms


def test_video_blocks_can_start_as_the_image_blocks(setup, tmp_path):
    cfg = load_config(None, overrides(setup, tmp_path, "--video.init_cross_attention=image"))
    task = VideoTask.from_config(cfg)
    model = task._new_model()
    task.init_weights(model)
    for key, block in model.video.cross_attention.items():
        image_block = model.cross_attention[key].state_dict()
        for name, value in block.state_dict().items():
            expected = torch.zeros_like(value) if name.startswith("gate") else image_block[name]
            assert torch.equal(value, expected), name
    image_model, _, _ = load_multimodal_model(setup / "image_model")
    batch = task.encode(list(task.dataset("val", loop=False))[:2])
    args, kwargs = task.inputs(batch)
    with torch.no_grad():  # shut gates: the video changes nothing yet
        assert torch.equal(model.eval()(*args, **kwargs), image_model(*args))


def test_cached_encoder_features_train_as_the_frames_do(setup, tmp_path):
    """`video.cache_features`: each clip's frozen encoder output is computed once and trains the adapter as
    its frames would (same losses and gradient norms; only float summation order differs)."""
    frames = run_video(setup, tmp_path / "frames", ["--train.steps=5", "--video.cache_frames=true"])
    cfg = load_config(
        None, overrides(setup, tmp_path / "features", "--train.steps=5", "--video.cache_features=true")
    )
    task = VideoTask.from_config(cfg)
    result = train(cfg, task, show_progress=False)
    losses = [h["loss"] for h in result.history]
    norms = [h["grad_norm"] for h in result.history]
    assert losses == pytest.approx(frames[0], rel=1e-5, abs=1e-6)
    assert norms == pytest.approx(frames[1], rel=1e-4, abs=1e-6)
    # 5 steps × 4 clips of 24: every clip seen is encoded exactly once, and kept as features, not frames
    cache = task.train_data._cache
    assert task.frame_encoder().calls == len(cache) <= 20
    assert all(type(v).__name__ == "FrameFeatures" for v in cache.values())
    assert next(iter(cache.values())).features.shape[0] == 4  # (F, K, N, Dv): video.num_frames frames


def test_cached_features_need_a_frozen_encoder(setup, tmp_path):
    cfg = load_config(
        None, overrides(setup, tmp_path, "--video.cache_features=true", "--video.trainable=all")
    )
    with pytest.raises(ValueError, match="cache_features.*trainable"):
        VideoTask.from_config(cfg)


def test_the_quickstart_config_trains_the_time_scales_faster(setup, tmp_path):
    """The quickstart's lr multipliers reach what they are meant to: the first key a name contains wins, so
    `value_time_scale` (×50) must not be swallowed by `resampler` (×5)."""
    from herd.optim import multiplier_matches
    from herd.paths import config_path

    cfg = load_config(
        config_path("quickstart_video.toml"),
        [f"--video.init_from={setup / 'image_model'}", f"--video.train_manifest={setup / 'videos' / 'train.jsonl'}",
         f"--train.run_dir={tmp_path}"],
    )  # fmt: skip
    task = VideoTask.from_config(cfg)
    assert task.perceiver_args.time_scaled_values and task.perceiver_args.spatial_tokens == 65
    found = multiplier_matches(task.build_model().named_parameters(), cfg.optimizer.lr_multipliers)
    assert found["value_time_scale"] == [
        f"video.resampler.layers.{i}.attention.value_time_scale" for i in (0, 1)
    ]
    assert "video.resampler.latents" in found["resampler"]
    assert not any(n.startswith("video.resampler") for k in ("gate_attn", "q_norm") for n in found[k])
