"""Resuming from a DCP checkpoint gives the uninterrupted run's losses: exactly on one process, and
within the layout tolerance when the run resumes on a different mesh (FSDP×2 → TP×2)."""

import pytest

from herd.config import load_config
from herd.parallel.launch import spawn_ranks
from herd.tasks.text import TextPretrainTask
from herd.trainer import NonFiniteLossError, train

BASE = [
    "--model.vocab_subset=true", "--model.args.dim=64", "--model.args.n_layers=2", "--model.args.n_heads=4",
    "--model.args.n_kv_heads=2", "--model.args.multiple_of=16", "--data.synthetic_docs=300", "--data.seq_len=32",
    "--data.batch_size=4", "--train.steps=6", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--train.device=cpu", "--train.eval_every=0", "--optimizer.lr=3e-3", "--schedule.warmup_steps=2",
    "--checkpoint.interval=3",
]  # fmt: skip


def losses_by_step(run_dir: str, overrides: list[str]) -> dict[int, float]:
    cfg = load_config(None, [f"--train.run_dir={run_dir}", *BASE, *overrides])
    result = train(cfg, TextPretrainTask.from_config(cfg), show_progress=False)
    return {h["step"]: h["loss"] for h in result.history if "split" not in h}


def test_single_process_resume_is_bit_exact(tmp_path):
    full = losses_by_step(str(tmp_path / "a"), [])
    step3 = tmp_path / "a" / "checkpoints" / "step-00000003"
    assert step3.is_dir() and (tmp_path / "a" / "checkpoints" / "step-00000006").is_dir()
    resumed = losses_by_step(str(tmp_path / "b"), [f"--checkpoint.resume={step3}"])
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in (4, 5, 6)), (resumed, full)


def test_resume_on_another_mesh(tmp_path):
    fsdp = spawn_ranks(losses_by_step, 2, str(tmp_path / "a"), ["--parallel.dp_shard=2"])[0]
    step3 = tmp_path / "a" / "checkpoints" / "step-00000003"
    tp = spawn_ranks(
        losses_by_step, 2, str(tmp_path / "b"),
        ["--parallel.tp=2", "--parallel.dp_shard=1", f"--checkpoint.resume={step3}"],
    )[0]  # fmt: skip
    assert sorted(tp) == [4, 5, 6]
    assert max(abs(tp[s] - fsdp[s]) for s in (4, 5, 6)) < 1e-4, (tp, fsdp)


def test_auto_resume_continues_an_interrupted_run(tmp_path):
    first = losses_by_step(str(tmp_path), ["--train.steps=3", "--checkpoint.save_final=true"])
    assert sorted(first) == [1, 2, 3]
    # the same run directory, now asked for 6 steps with a schedule for 6: picks up at step 4
    again = losses_by_step(str(tmp_path), [])
    assert sorted(again) == [4, 5, 6]


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path):
    cfg = load_config(None, [f"--train.run_dir={tmp_path}", *BASE])
    task = TextPretrainTask.from_config(cfg)
    real_loss, calls = task.loss, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real_loss(model, batch)
        if calls["n"] == 5:
            out.loss_sum = out.loss_sum * float("inf")
        return out

    task.loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"at step 5 .*step-00000003"):
        train(cfg, task, show_progress=False)
