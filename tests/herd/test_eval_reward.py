"""`herd eval reward`: a tiny policy's greedy replies scored by a tiny reward model; the written rewards equal
a direct `RewardModelScorer` call on (prompt + reply), a policy against itself wins exactly half."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_workspaces import write_tiny_llm

from herd.cli import main
from herd.evaluation.reward_scores import summarize
from herd.text.chat_format import Message

pytest.importorskip("matplotlib")
WORDS = [
    "What color is the sky? Name a fruit. Count to three. blue red apple one two three",
    "system user assistant\n\n",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from herd.text.loading import load_pretrained
    from herd.text.reward_model import RewardModel, save_reward_model

    root = tmp_path_factory.mktemp("reward")
    write_tiny_llm(root / "llm", WORDS, 64)
    llm, tokenizer = load_pretrained(root / "llm")
    rm = RewardModel(llm.args)
    state = {k: v for k, v in llm.state_dict().items() if not k.startswith("output.")}
    rm.trunk.load_state_dict(state, strict=False)
    torch.manual_seed(2)
    rm.reset_score_head()
    save_reward_model(rm, tokenizer, root / "rm")
    prompts = [{"prompt": "What color is the sky?"}, {"prompt": "Name a fruit."}, {"prompt": "Count to three."},
               {"messages": [{"role": "assistant", "content": "hi"}]}, {"prompt": "x" * 400}]  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def test_reward_distribution_of_greedy_replies(workspace) -> None:
    from herd.sample import RewardModelScorer
    from herd.text.reward_model import load_reward_model

    root = workspace
    out = root / "out"
    argv = ["eval", "reward", "--model", str(root / "llm"), "--reward-model", str(root / "rm"), "--prompts",
            str(root / "prompts.jsonl"), "--baseline", str(root / "llm"), "--out", str(out), "--max-new-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "reward.json").read_text())
    rows = [json.loads(x) for x in (out / "reward.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and report["skipped"] == {"bad_record": 1, "too_long": 1}
    rm, tok = load_reward_model(root / "rm")
    dialogs = [[Message("user", r["prompt"]), Message("assistant", r["model_reply"])] for r in rows]
    direct = RewardModelScorer(rm, tok)(dialogs)
    assert [r["model_reward"] for r in rows] == pytest.approx(direct, abs=1e-5)
    assert report["model"] == pytest.approx(summarize([r["model_reward"] for r in rows]))
    assert report["win_rate"] == 0.5  # the baseline is the same checkpoint: every pair ties
    assert len({round(r, 6) for r in direct}) > 1  # the replies differ and so do their rewards
    assert (out / "reward.png").stat().st_size > 1000


def test_summary_quantiles() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["min"], s["p25"], s["median"], s["p75"], s["max"], s["mean"]) == (1.0, 2.0, 3.0, 4.0, 5.0, 3.0)
    assert s["std"] == pytest.approx(2**0.5)
