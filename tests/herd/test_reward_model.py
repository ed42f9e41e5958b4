"""Reward model task: Bradley–Terry with margins, edited rankings, learning, export, and parallel parity."""

import json
import math

import pytest
import torch
from tiny_workspaces import write_preference_workspace
from torch import nn

from herd.config import load_config
from herd.data.training.preferences import parse_preference
from herd.parallel.launch import spawn_ranks
from herd.tasks.reward import MARGINS, RewardModelTask, bradley_terry_loss, evaluate_ranking
from herd.text.reward_model import load_reward_model, save_reward_model
from herd.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_preference_workspace(tmp_path_factory.mktemp("rm"), 300, 80)


def overrides(root, run_dir, *extra):
    return [
        f"--model.init_from={root / 'llm'}", f"--rm.train_data={root / 'prefs' / 'train.jsonl'}",
        f"--rm.val_data={root / 'prefs' / 'val.jsonl'}", f"--train.run_dir={run_dir}", "--data.batch_size=8",
        "--data.seq_len=96", "--metrics.log_every=1", "--train.eval_every=0", "--metrics.tensorboard=false",
        "--checkpoint.save_final=false", "--checkpoint.resume=none", "--train.device=cpu", "--optimizer.lr=3e-3",
        "--schedule.warmup_steps=5", *extra,
    ]  # fmt: skip


class FixedRewards(nn.Module):
    """Stands in for a RewardModel: the reward of a row is a lookup of its last token's position."""

    def __init__(self, rewards: torch.Tensor) -> None:  # (B, N)
        super().__init__()
        self.rewards = rewards

    def forward(self, tokens, last_index):  # (B·N, T), (B·N,)
        return self.rewards.flatten()


@pytest.mark.parametrize("margin", ["none", "small", "large"])
def test_bradley_terry_loss_with_each_margin_equals_the_formula(setup, tmp_path, margin):
    task = RewardModelTask.from_config(load_config(None, overrides(setup, tmp_path, f"--rm.margin={margin}")))
    strengths = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    base = {"prompt": "Question: what is 3 plus 4?", "chosen": "3 plus 4 is 7.", "rejected": "3 plus 4 is 9."}
    records = [parse_preference({**base, "strength": s}) for s in strengths]
    rewards = torch.tensor([[0.5, 0.25], [1.0, -1.0], [0.0, 0.75], [2.0, 1.0]])  # (B, chosen/rejected)
    out = task.loss(FixedRewards(rewards), task.collate(records))
    table = {"none": [0, 0, 0, 0], "small": [1, 2 / 3, 1 / 3, 0], "large": [3, 2, 1, 0]}[
        margin
    ]  # Llama 2 Table 27
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - m)))) for (c, r), m in zip(rewards.tolist(), table))
    assert out.num_targets == 4 and abs(float(out.loss_sum) - want) < 1e-5
    assert out.extra["correct_pairs"] == 3  # all but the third pair (0.0 < 0.75) are ranked right
    assert [MARGINS[margin][s] for s in strengths] == pytest.approx(table)
    direct = bradley_terry_loss(rewards[:, 0], rewards[:, 1], torch.tensor(table, dtype=torch.float32))
    assert abs(float(direct.sum()) - want) < 1e-5


def test_edited_response_adds_three_ordered_pairs(setup, tmp_path):
    task = RewardModelTask.from_config(load_config(None, overrides(setup, tmp_path, "--rm.margin=large")))
    record = parse_preference({"prompt": "Question: what is 3 plus 4?", "chosen": "7.", "rejected": "3 plus 4 is 9.",
                               "edited": "3 plus 4 is 7.", "strength": "better"})  # fmt: skip
    batch = task.collate([record])
    e, c, r = 1.0, 0.5, -0.25  # rewards of edited, chosen, rejected
    out = task.loss(FixedRewards(torch.tensor([[c, r, e]])), batch)  # N order: chosen, rejected, edited
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # edited > chosen (no margin: the strength rates chosen vs rejected), edited > rejected and chosen > rejected (m = 2)
    want = -math.log(sig(c - r - 2)) - math.log(sig(e - c)) - math.log(sig(e - r - 2))
    assert out.num_targets == 3 and abs(float(out.loss_sum) - want) < 1e-5 and out.extra["correct_pairs"] == 3
    flipped = task.loss(FixedRewards(torch.tensor([[e, r, c]])), batch)  # chosen above edited: one pair wrong
    assert flipped.extra["correct_pairs"] == 2


def test_ranking_accuracy_rises_above_chance_and_export_round_trips(setup, tmp_path):
    cfg = load_config(None, overrides(setup, tmp_path, "--train.steps=40", "--data.batch_size=16"))
    task = RewardModelTask.from_config(cfg)
    start = task.build_model()
    start.to_empty(device="cpu")
    start.trunk.init_rope()
    torch.manual_seed(0)
    task.init_weights(start)
    before = evaluate_ranking(start, task, task.val_records)
    result = train(cfg, task, show_progress=False)
    after = evaluate_ranking(result.model, task, task.val_records)
    # measured: 0.55 → 0.67 on 98 held-out pairs (80 records) after 40 steps from a random tiny trunk
    assert after["pairs"] == before["pairs"] > 80
    assert after["accuracy"] >= 0.6 and after["accuracy"] > before["accuracy"] + 0.05, (before, after)
    assert set(after["by_strength"]) <= {
        "edited",
        "significantly_better",
        "better",
        "slightly_better",
        "negligibly_better",
    }
    # the trunk started from the checkpoint; the LM head is not part of the reward model
    assert "trunk.output.weight" not in result.model.state_dict()

    # save / load: identical rewards; the CLI export writes the same layout
    model = result.model.eval()
    out = save_reward_model(model, task.tokenizer, tmp_path / "rm")
    loaded, tokenizer = load_reward_model(out)
    batch = task.collate(task.val_records[:8])
    B, N, T = batch["tokens"].shape
    with torch.no_grad():
        a = model(batch["tokens"].view(B * N, T), batch["last_index"].view(-1))
        b = loaded(batch["tokens"].view(B * N, T), batch["last_index"].view(-1))
    assert torch.equal(a, b) and tokenizer.vocab_size == task.tokenizer.vocab_size
    assert json.loads((out / "reward_model.json").read_text())["kind"] == "reward_model"
    exported = task.export(result.runtime.full_state_dict(), tmp_path / "export", "meta")
    assert torch.equal(load_reward_model(exported)[0].score.weight, model.score.weight)
    with pytest.raises(FileNotFoundError, match="reward_model.json"):
        load_reward_model(setup / "llm")


def test_unsupported_layouts_and_margins_are_clear_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="rm.margin"):
        RewardModelTask.from_config(load_config(None, overrides(setup, tmp_path, "--rm.margin=huge")))
    with pytest.raises(ValueError, match="context parallelism"):
        RewardModelTask.from_config(load_config(None, overrides(setup, tmp_path, "--parallel.cp=2")))
    with pytest.raises(ValueError, match="sequence_parallel"):
        RewardModelTask.from_config(
            load_config(
                None, overrides(setup, tmp_path, "--parallel.tp=2", "--parallel.sequence_parallel=false")
            )
        )


def run_rm(root, run_dir, extra):
    cfg = load_config(None, overrides(root, run_dir, "--train.steps=3", *extra))
    return [h["loss"] for h in train(cfg, RewardModelTask.from_config(cfg), show_progress=False).history]


def run_rm_layouts(root, run_dir, layouts):
    """Several layouts one after another in the same ranks (one process start-up for all)."""
    return [run_rm(root, run_dir / str(i), extra) for i, extra in enumerate(layouts)]


@pytest.mark.multiprocess
def test_fsdp_and_tensor_parallel_match_single_process(setup, tmp_path):
    single = run_rm(setup, tmp_path / "a", [])
    # TP with sequence parallelism: the trunk's final hidden states are sequence-sharded DTensors, and the
    # score head is replicated over the TP mesh (measured also for FSDP×TP on 4 ranks: same losses)
    layouts = [["--parallel.dp_shard=2"], ["--parallel.tp=2", "--parallel.dp_shard=1"]]
    fsdp, tp = spawn_ranks(run_rm_layouts, 2, setup, tmp_path / "b", layouts)[0]
    assert len(single) == 3
    assert max(abs(a - b) for a, b in zip(single, fsdp)) < 1e-4, (single, fsdp)
    assert max(abs(a - b) for a, b in zip(single, tp)) < 1e-4, (single, tp)
