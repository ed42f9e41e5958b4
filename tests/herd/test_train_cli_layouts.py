"""`herd train` through the command line on several ranks, as a user runs it: every run finishes and
writes its final model, with and without a validation split whose last batch is ragged, and the model
equals the one a single process trains (pipeline stages gathered from every rank).

Before the core redesign a pipeline-parallel run crashed at the end: the final evaluation could not split
a ragged validation batch into micro-batches, and without a validation split the export held only the
first stage's weights."""

import json

import pytest
from tiny_workspaces import write_vision_workspace

from herd.cli import main
from herd.parallel.launch import spawn_ranks
from herd.text.loading import load_checkpoint

TEXT = [
    "--model.vocab_subset=true", "--model.args.dim=64", "--model.args.n_layers=4", "--model.args.n_heads=4",
    "--model.args.n_kv_heads=2", "--model.args.multiple_of=16", "--data.synthetic_docs=300", "--data.seq_len=32",
    "--data.batch_size=4", "--train.steps=3", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--train.device=cpu", "--checkpoint.save_final=false", "--checkpoint.resume=none", "--optimizer.lr=3e-3",
    "--schedule.warmup_steps=1", "--train.eval_every=3",
]  # fmt: skip
# 300 documents, 1 % held out: 3 documents make 3 validation windows of 32 tokens, fewer than a batch of 4,
# so the one validation batch has 3 rows: not a multiple of 2 micro-batches (nor of 2 data ranks)
RAGGED_VAL = ["--data.val_fraction=0.01"]
NO_VAL = ["--data.val_fraction=0"]


def train_text(run_dir: str, extra: list[str]) -> None:
    main(["train", "text", "--config", "configs/text/tiny.toml", f"--train.run_dir={run_dir}", *TEXT, *extra])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = {}
    for name, val in (("ragged", RAGGED_VAL), ("no_val", NO_VAL)):
        run = tmp_path_factory.mktemp(f"single_{name}")
        train_text(str(run), val)
        out[name] = run
    return out


def assert_same_model(run, reference) -> None:
    _, state = load_checkpoint(run / "model")
    _, ref = load_checkpoint(reference / "model")
    assert state.keys() == ref.keys()  # every stage's layers, the embedding, the head
    worst = max(float((state[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-4, worst


def layouts_in_one_job(root: str, layouts: dict[str, list[str]]) -> None:
    for name, extra in layouts.items():
        train_text(f"{root}/{name}", extra)


@pytest.mark.multiprocess
def test_text_pipeline_run_finishes_and_exports_the_whole_model(single, tmp_path):
    pp2 = ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]
    layouts = {"ragged": [*pp2, *RAGGED_VAL], "no_val": [*pp2, *NO_VAL]}
    spawn_ranks(layouts_in_one_job, 2, str(tmp_path), layouts, timeout_s=300)
    for name in layouts:
        assert_same_model(tmp_path / name, single[name])
    got, ref = metrics(tmp_path / "ragged"), metrics(single["ragged"])
    val, ref_val = [r for r in got if r.get("split") == "val"], [r for r in ref if r.get("split") == "val"]
    assert len(val) == 1 and abs(val[0]["loss"] - ref_val[0]["loss"]) < 1e-4  # the ragged batch is counted


@pytest.mark.multiprocess
@pytest.mark.slow
def test_text_pipeline_times_context_parallel_run_exports(single, tmp_path):
    layout = ["--parallel.pp=2", "--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]
    spawn_ranks(layouts_in_one_job, 4, str(tmp_path), {"ragged": [*layout, *RAGGED_VAL]}, timeout_s=400)
    assert_same_model(tmp_path / "ragged", single["ragged"])


@pytest.mark.multiprocess
def test_data_parallel_ragged_validation_counts_every_row(single, tmp_path):
    """3 validation rows over 2 data ranks: one rank takes 2 rows, the other 1; the loss equals one process's."""
    spawn_ranks(layouts_in_one_job, 2, str(tmp_path), {"ragged": ["--parallel.dp_shard=2", *RAGGED_VAL]})
    val = [r for r in metrics(tmp_path / "ragged") if r.get("split") == "val"]
    ref = [r for r in metrics(single["ragged"]) if r.get("split") == "val"]
    assert abs(val[0]["loss"] - ref[0]["loss"]) < 1e-4


# --- the image adapter on 2 ranks writes a model `herd ask` loads --------------------------------------------
def train_vision(root: str, run_dir: str, extra: list[str]) -> None:
    main(["train", "vision", "--config", f"{root}/vision.toml", f"--vision.llm={root}/llm", f"--vision.train_manifest={root}/shapes/train.jsonl",
          f"--vision.val_manifest={root}/shapes/val.jsonl", "--vision.cross_attention_every=1",
          f"--train.run_dir={run_dir}", "--train.steps=3", "--data.batch_size=4", "--train.eval_every=3",
          "--metrics.tensorboard=false", "--checkpoint.save_final=false", "--checkpoint.resume=none",
          "--train.device=cpu", *extra])  # fmt: skip


@pytest.mark.multiprocess
def test_vision_on_two_ranks_writes_a_model_herd_ask_loads(tmp_path, capsys):
    root = write_vision_workspace(tmp_path / "ws", 32, 7)  # 7 validation images: a ragged last batch
    (root / "vision.toml").write_text("[vision]\nencoder = 'tiny'\n")
    train_vision(str(root), str(tmp_path / "single"), [])
    spawn_ranks(train_vision, 2, str(root), str(tmp_path / "fsdp"), ["--parallel.dp_shard=2"])
    from safetensors.torch import load_file

    a = load_file(tmp_path / "fsdp" / "model" / "adapter.safetensors")
    b = load_file(tmp_path / "single" / "model" / "adapter.safetensors")
    assert a.keys() == b.keys() and not any(k.startswith("llm.") for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    image = root / "shapes" / "images" / "val" / "000000.png"
    capsys.readouterr()
    main(["ask", "--model", str(tmp_path / "fsdp" / "model"), "--image", str(image), "--question",
          "How many shapes are there?", "--max-new-tokens", "3"])  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}\tHow many shapes are there?\t")
