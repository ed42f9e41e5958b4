"""The one training loop: exact gradient accumulation, schedule, metrics, NaN stop, learning."""

import math

import pytest
import torch

from herd.config import ScheduleConfig, load_config
from herd.metrics import read_metrics
from herd.optim import describe_multipliers, lr_multiplier, multiplier_matches, param_groups
from herd.tasks.text import TextPretrainTask
from herd.trainer import LossOutput, NonFiniteLossError, train

SMALL = [
    "--model.vocab_subset=true",
    "--model.args.dim=64",
    "--model.args.n_layers=2",
    "--model.args.n_heads=4",
]
SMALL += [
    "--model.args.n_kv_heads=2",
    "--data.synthetic_docs=400",
    "--data.seq_len=32",
    "--metrics.tensorboard=false",
]


def config(tmp_path, *extra):
    return load_config(None, [f"--train.run_dir={tmp_path}", "--train.device=cpu", *SMALL, *extra])


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = config(tmp_path / "a", "--data.batch_size=8", "--train.steps=3", "--metrics.log_every=1")
    acc = config(
        tmp_path / "b",
        "--data.batch_size=4",
        "--train.grad_accum=2",
        "--train.steps=3",
        "--metrics.log_every=1",
    )
    ra, rb = (
        train(big, TextPretrainTask.from_config(big), show_progress=False),
        train(acc, TextPretrainTask.from_config(acc), show_progress=False),
    )
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if "split" not in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if "split" not in r]
    assert len(la) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    for (n, p), (_, q) in zip(ra.model.named_parameters(), rb.model.named_parameters()):
        assert (p - q).abs().max().item() < 1e-5, n


def test_schedule_golden_values():
    cfg = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_multiplier(int(mid), 110, cfg) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_multiplier(109, 110, cfg) == pytest.approx(0.1)
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_multiplier(50, 101, lin) == pytest.approx(0.5)


def test_training_learns_and_writes_metrics(tmp_path):
    cfg = config(
        tmp_path,
        "--data.batch_size=8",
        "--train.steps=40",
        "--metrics.log_every=10",
        "--train.eval_every=20",
        "--optimizer.lr=3e-3",
        "--schedule.warmup_steps=5",
        "--data.val_fraction=0.2",
    )
    result = train(cfg, TextPretrainTask.from_config(cfg), show_progress=False)
    records = read_metrics(tmp_path)
    train_losses = [r["loss"] for r in records if "split" not in r]
    assert [r["step"] for r in records if "split" not in r] == [10, 20, 30, 40]
    assert {"loss", "grad_norm", "lr", "targets_per_s"} <= set(records[0])
    assert train_losses[-1] < 0.6 * train_losses[0]
    vals = [r for r in records if r.get("split") == "val"]
    assert len(vals) == 2 and result.val_loss == vals[-1]["loss"]


class FrozenEmbeddingTask(TextPretrainTask):
    """Freezes the embedding at init, as adapters freeze the LLM."""

    def init_weights(self, model):
        super().init_weights(model)
        model.tok_embeddings.weight.requires_grad_(False)
        self.initial_embedding = model.tok_embeddings.weight.detach().clone()


def test_frozen_parameters_never_change_and_are_not_optimised(tmp_path):
    cfg = config(tmp_path, "--data.batch_size=4", "--train.steps=3", "--optimizer.weight_decay=0.5")
    task = FrozenEmbeddingTask.from_config(cfg)
    result = train(cfg, task, show_progress=False)
    assert torch.equal(task.initial_embedding, result.model.tok_embeddings.weight)
    moved = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert "tok_embeddings.weight" not in moved and "output.weight" in moved


def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = config(tmp_path, "--data.batch_size=4", "--train.steps=5")
    task = TextPretrainTask.from_config(cfg)
    real_loss = task.loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real_loss(model, batch)
        return LossOutput(out.loss_sum * (float("nan") if calls["n"] == 3 else 1.0), out.num_targets)

    task.loss = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg, task, show_progress=False)


class TopOneAccuracyTask(TextPretrainTask):
    """Reports the count of targets the model's argmax predicts as an auxiliary metric."""

    def loss(self, model, batch):
        logits = model(batch["tokens"], document_ids=batch["document_ids"])
        out = super().loss(model, batch)
        keep = batch["labels"] != -100
        correct = (logits.argmax(-1) == batch["labels"])[keep].sum()
        self.seen.append((float(correct), int(keep.sum())))
        return LossOutput(out.loss_sum, out.num_targets, {"correct": float(correct)})


def test_task_extras_are_summed_over_the_window_and_logged_per_target(tmp_path):
    cfg = config(tmp_path, "--data.batch_size=4", "--train.steps=4", "--metrics.log_every=2")
    task = TopOneAccuracyTask.from_config(cfg)
    task.seen = []
    result = train(cfg, task, show_progress=False)
    logged = [h["correct"] for h in result.history if "split" not in h]
    expected = [
        sum(c for c, _ in task.seen[i : i + 2]) / sum(n for _, n in task.seen[i : i + 2]) for i in (0, 2)
    ]
    assert logged == pytest.approx(expected, abs=1e-12) and len(logged) == 2


def test_lr_multipliers_report_what_each_substring_reaches():
    """A key reaches every trainable name that contains it (first key wins), exactly the tensors that
    `param_groups` speeds up; the report says so before training, and flags keys that reach nothing."""
    model = torch.nn.ModuleDict(
        {
            "cross": torch.nn.ModuleDict({"gate_attn": torch.nn.Linear(2, 2)}),
            "gated_positional_embedding": torch.nn.Linear(2, 2),
            "frozen_gate": torch.nn.Linear(2, 2).requires_grad_(False),
        }
    )
    multipliers = {"gate_attn": 30.0, "gate": 10.0, "typo": 2.0}
    found = multiplier_matches(model.named_parameters(), multipliers)
    assert found == {
        "gate_attn": ["cross.gate_attn.weight", "cross.gate_attn.bias"],
        "gate": ["gated_positional_embedding.weight", "gated_positional_embedding.bias"],
        "typo": [],
    }
    groups = param_groups(model.named_parameters(), 0.0, 1e-3, multipliers)
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-2, 3e-2])
    lines = describe_multipliers(found, multipliers)
    assert lines[0].startswith("lr × 30 'gate_attn': 2 tensors (cross.gate_attn.weight")
    assert lines[2] == "lr × 2 'typo': matches no trainable parameter here"


def test_metrics_window_divides_a_tasks_sums_by_targets_or_their_own_count():
    """LossOutput.extra: `correct_pairs` per target (ranking accuracy), `reward` per its `reward_count`."""
    from herd.trainer import MetricsWindow, StepResult

    window = MetricsWindow(flops_per_target=None, peak_tflops=None, world=1)
    for extra in ({"correct_pairs": 3.0, "reward": 2.0, "reward_count": 4.0},
                  {"correct_pairs": 5.0, "reward": -1.0, "reward_count": 2.0}):  # fmt: skip
        window.add(StepResult(loss=0.5, targets=8, grad_norm=1.0, lr=1e-3, extra=extra))
    record = window.record(StepResult(0.5, 8, 1.0, 1e-3, {}), torch.device("cpu"), {"docs": {"bad_json": 2}})
    assert (
        record["correct_pairs"] == 8 / 16 and record["reward"] == 1.0 / 6.0 and "reward_count" not in record
    )
    assert record["loss"] == 0.5 and record["skipped/docs"] == 2.0 and record["skipped/docs/bad_json"] == 2.0
