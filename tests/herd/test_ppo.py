"""PPO (`herd train ppo`): the objective's pieces equal their formulas, rollouts are batch- and
rank-independent, a toy reward is learnt through the one training loop with the reference and reward
model frozen, and FSDP matches one process."""

import hashlib
import json
import math

import pytest
import torch

from herd.config import load_config
from herd.data.records import SkipCounter
from herd.parallel.launch import spawn_ranks
from herd.tasks.ppo import (
    PPOTask,
    Rollout,
    gae_advantages,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from herd.tasks.ppo_rollout import (
    Prompt,
    PromptBatches,
    Responses,
    read_prompts,
    row_uniforms,
    sample_responses,
)
from herd.text import build_llama, get_preset
from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import SamplingParams, generate
from herd.text.loading import load_checkpoint, load_pretrained, save_text_model
from herd.text.reward_model import RewardModel, load_reward_model, save_reward_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer
from herd.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "Tell me about cats.", "Tell me about dogs please.", "A story about birds.", "The weather today?",
    "Fish?", "Tell me a good story about the weather today please.", "Yes or no?", "Maybe dogs are bad.",
]  # fmt: skip
WORDS = "Tell me about cats dogs birds fish the weather today please a story yes no maybe good bad"


def counting_reward_model(args, token: int, scale: float = 0.5) -> RewardModel:
    """A RewardModel whose score rises with the fraction f of `token` among the tokens up to the scored one.

    Every token embeds as e2 except `token` (e0); layer 0 attends uniformly (zero queries) and writes the
    running mean of "is `token`" into dim 1; everything else adds nothing. The final RMSNorm then gives
    dim 1 = 8f/√(1+f²), so the score is 8·scale·f/√(1+f²)."""
    rm = RewardModel(args)
    rm.init_weights()
    with torch.no_grad():
        t = rm.trunk
        t.tok_embeddings.weight.zero_()
        t.tok_embeddings.weight[:, 2] = 1.0
        t.tok_embeddings.weight[token] = 0.0
        t.tok_embeddings.weight[token, 0] = 1.0
        for layer in t.layers.values():
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        attn = t.layers["0"].attention
        for w in (attn.wq.weight, attn.wk.weight, attn.wv.weight):
            w.zero_()
        attn.wv.weight[0, 0] = 1 / 8  # the normed input is 8·e0 on `token`: value 1 there, 0 elsewhere
        attn.wo.weight[1, 0] = 1.0
        rm.score.weight.zero_()
        rm.score.weight[0, 1] = scale
        rm.score.bias.zero_()
    return rm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny policy with a mild prior for " yes", a reward model that pays for " yes", prompts (+2 bad)."""
    root = tmp_path_factory.mktemp("ppo")
    tok = SubsetTokenizer.from_texts(Tokenizer(), ["system user assistant\n\n", WORDS, *PROMPTS])
    target = tok.encode(" yes")[0]
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    policy = build_llama(args)
    with torch.no_grad():  # a constant feature in dim 0 read by the " yes" row: P(" yes") ≈ 4% at the start
        policy.tok_embeddings.weight[:, 0] += 3.0
        policy.output.weight[target, 0] = 1.2
    save_text_model(policy.state_dict(), args, tok, root / "policy", "meta")
    save_reward_model(counting_reward_model(args, target), tok, root / "rm")
    lines = [json.dumps({"prompt": p}) for p in PROMPTS]
    lines[3] = json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": PROMPTS[3]}]})  # fmt: skip
    lines += ["not json", json.dumps({"messages": [{"role": "assistant", "content": "x"}]})]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root, target


def overrides(root, run_dir, *extra):
    return [
        f"--model.init_from={root / 'policy'}", f"--ppo.reward_model={root / 'rm'}",
        f"--ppo.train_data={root / 'prompts.jsonl'}", f"--train.run_dir={run_dir}", "--data.batch_size=8",
        "--metrics.log_every=1", "--train.eval_every=0", "--metrics.tensorboard=false",
        "--checkpoint.save_final=false", "--checkpoint.resume=none", "--train.device=cpu",
        "--optimizer.lr=1e-3", "--schedule.warmup_steps=0", "--schedule.decay=constant",
        "--ppo.epochs=2", "--ppo.max_new_tokens=8", "--ppo.kl_coef=0.05", *extra,
    ]  # fmt: skip


# --- the objective's pieces vs hand computations ------------------------------------------------------------
def test_kl_penalized_rewards_and_gae_match_hand_formulas():
    scores = torch.tensor([2.0, -1.0])
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.1, -4.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-0.3, -0.6, -1.0, -2.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    values = torch.tensor([[0.5, 0.1, -0.3, 9.0], [1.0, 0.2, 0.0, 0.4]])
    rewards, kl = kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.1)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for b in range(2):
        n = int(mask[b].sum())
        r = [
            -0.1 * (lp[b, t] - ref[b, t]).item() + (scores[b].item() if t == n - 1 else 0.0) for t in range(n)
        ]
        v = values[b, :n].tolist() + [0.0]  # the value after the last token is 0
        for t in range(4):
            assert math.isclose(kl[b, t], (lp[b, t] - ref[b, t]).item() if t < n else 0.0, abs_tol=1e-6)
            assert math.isclose(rewards[b, t], r[t] if t < n else 0.0, abs_tol=1e-6)
            deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
            a = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) if t < n else 0.0
            assert math.isclose(adv[b, t], a, abs_tol=1e-5), (b, t)
            assert math.isclose(ret[b, t], a + v[t] if t < n else 0.0, abs_tol=1e-5)
    # γ = 1, λ = 1: the advantage is the return-to-go minus the value
    adv1, _ = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert math.isclose(adv1[0, 0], rewards[0, :3].sum().item() - 0.5, abs_tol=1e-5)


def test_ppo_losses_match_hand_formulas():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    new = old + torch.tensor([[0.5, -0.5, 0.05, 2.0]])  # ratios e^.5, e^-.5 (both clipped), ~1, masked
    adv = torch.tensor([[1.0, -2.0, 3.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, clipped, approx_kl = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    expected, n_clipped, k3 = 0.0, 0, 0.0
    for t in range(3):
        ratio = math.exp(new[0, t] - old[0, t])
        a = adv[0, t].item()
        terms = (-a * ratio, -a * min(max(ratio, 0.8), 1.2))
        expected += max(terms)
        n_clipped += terms[1] > terms[0]
        k3 += (ratio - 1) - math.log(ratio)
    assert math.isclose(loss, expected, rel_tol=1e-6) and int(clipped) == n_clipped == 2
    assert math.isclose(approx_kl, k3, rel_tol=1e-5)
    # at ratio 1 (PPO's first epoch) nothing is clipped and the loss is −Σ A
    loss1, clipped1, kl1 = ppo_policy_loss(old, old, adv, mask, clip=0.2)
    assert loss1.item() == -(1.0 - 2.0 + 3.0) and int(clipped1) == 0 and kl1.item() == 0.0

    values = torch.tensor([[1.0, 0.0, 2.0]])
    old_values = torch.tensor([[0.5, 0.5, 2.1]])
    returns = torch.tensor([[0.0, 1.0, 3.0]])
    vloss = ppo_value_loss(values, old_values, returns, torch.tensor([[True, True, False]]), clip=0.2)
    # t0: max((1-0)², (0.7-0)²) = 1; t1: max((0-1)², (0.3-1)²) = 1 → ½(1 + 1)
    assert math.isclose(vloss, 1.0, rel_tol=1e-6)


def test_whiten_and_token_logprobs():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 6.0]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    w = whiten(x, mask)
    expected = (kept - kept.mean()) / kept.var(unbiased=False).sqrt()
    assert torch.allclose(w[mask], expected, atol=1e-6) and w[1, 1] == 0.0
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 7, (2, 3))
    lp = token_logprobs(logits, targets, temperature=0.7, vocab_limit=7)
    manual = torch.log_softmax(logits[..., :7] / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(lp, manual)


# --- rollouts and their batches -----------------------------------------------------------------------------
class RealVocab(torch.nn.Module):
    """A Llama whose padding rows (ids ≥ the tokenizer's size) never win, as in `sample_from_uniforms`."""

    def __init__(self, llama, vocab_limit):
        super().__init__()
        self.llama, self.args, self.vocab_limit = llama, llama.args, vocab_limit

    def forward(self, tokens, kv_cache=None, start_pos=0):
        logits = self.llama(tokens, kv_cache=kv_cache, start_pos=start_pos)
        return logits.index_fill(-1, torch.arange(self.vocab_limit, logits.shape[-1]), -torch.inf)

    def new_kv_cache(self, *args, **kwargs):
        return self.llama.new_kv_cache(*args, **kwargs)


def test_rollouts_follow_generate_and_do_not_depend_on_the_batch(setup):
    root, _ = setup
    policy, tok = load_pretrained(root / "policy")
    model = RealVocab(policy, tok.vocab_size)
    fmt = ChatFormat(tok)
    prompts = [fmt.encode_dialog_prompt([Message("user", p)]) for p in PROMPTS[:3]]

    def run(rows, temperature, n=8):
        padded = torch.full((len(rows), max(map(len, rows))), tok.pad_id)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = torch.tensor(r)
        u = row_uniforms(0, torch.tensor([rows_index[id(r)] for r in rows]), n)
        return sample_responses(lambda t, c, s: model(t, kv_cache=c, start_pos=s),
                                lambda b, length: model.new_kv_cache(b, length), padded,
                                torch.tensor([len(r) for r in rows]), u, temperature, tok.vocab_size,
                                tok.stop_ids, tok.pad_id)  # fmt: skip

    rows_index = {id(p): i for i, p in enumerate(prompts)}
    greedy = run(prompts, 1e-6)  # a vanishing temperature samples the argmax
    done = generate(
        model, prompts, SamplingParams(max_new_tokens=8), stop_ids=tok.stop_ids, pad_id=tok.pad_id
    )
    for b, completion in enumerate(done):
        ours = greedy.tokens[b, greedy.positions[b]][greedy.mask[b]].tolist()
        assert ours == completion.tokens + (
            [completion.stop_token] if completion.stop_token is not None else []
        )
    # at temperature 1 a prompt's response depends on its stream index only, not on the rows around it
    full, pair = run(prompts, 1.0), run([prompts[2], prompts[0]], 1.0)
    for b_full, b_pair in ((0, 1), (2, 0)):
        assert torch.equal(
            full.tokens[b_full, full.positions[b_full]], pair.tokens[b_pair, pair.positions[b_pair]]
        )
        assert torch.equal(full.mask[b_full], pair.mask[b_pair])
    assert (full.last_index == torch.tensor([len(p) for p in prompts]) + full.mask.sum(1) - 1).all()
    last_token = full.tokens.gather(1, full.last_index[:, None])[:, 0]
    assert full.finished.tolist() == [t in tok.stop_ids for t in last_token.tolist()]


def test_every_row_decodes_n_tokens_and_is_masked_after_its_stop():
    """A counting "model" (next token = last + 1 mod 10, stop token 7): rows stop at different steps."""
    calls = []

    def step(tokens, cache, start):  # (b, T) → (b, T, 10)
        calls.append(tokens.shape[1])
        return 50.0 * torch.nn.functional.one_hot((tokens + 1) % 10, 10).float()

    prompts = torch.tensor([[3, 5, 0], [1, 0, 0], [8, 8, 8]])
    lens = torch.tensor([2, 1, 3])
    out = sample_responses(step, lambda b, n: None, prompts, lens, torch.rand(3, 4), 1.0, 10, {7}, pad_id=0)
    responses = out.tokens.gather(1, out.positions).tolist()
    assert responses == [[6, 7, 0, 0], [2, 3, 4, 5], [9, 0, 1, 2]]  # row 0 stopped: the rest is padding
    assert out.mask.tolist() == [[True, True, False, False], [True] * 4, [True] * 4]
    assert out.finished.tolist() == [True, False, False] and out.last_index.tolist() == [3, 4, 6]
    # P_max + N − P_min = 3 + 4 − 1 forward passes (the first reads the 1-token shortest prompt)
    assert calls == [1] * 6


def test_prompt_batches_rounds_ranks_and_resume():
    prompts = [Prompt([1] * (i % 3 + 1) + [100 + i], f"f:{i}") for i in range(10)]
    accum = lambda step: 2  # noqa: E731
    single = PromptBatches(prompts, 4, ppo_epochs=2, accum_at=accum, seed=3)
    order = [(b["rollout"], b["epoch"]) for b in (next(single) for _ in range(8))]
    # each step's 2 micro-batches are 2 rollouts; a rollout comes back for epoch 1 on the next step
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    ranks = [PromptBatches(prompts, 4, 2, accum, rank=r, world_size=2, seed=3) for r in range(2)]
    whole = single.batch(2, 0)
    halves = [rk.batch(2, 0) for rk in ranks]
    assert (
        torch.cat([h["stream_index"] for h in halves]).tolist()
        == whole["stream_index"].tolist()
        == [8, 9, 10, 11]
    )
    assert torch.cat([h["prompt_lens"] for h in halves]).tolist() == whole["prompt_lens"].tolist()

    def last(batch):  # each row's last prompt token
        return batch["prompt_tokens"].gather(1, batch["prompt_lens"][:, None] - 1)[:, 0].tolist()

    assert last(halves[0]) + last(halves[1]) == last(whole)
    # stream positions 8..11 wrap into the second shuffled pass: a permutation, not a repeat of the first
    first_pass = {int(single.batch(r, 0)["prompt_tokens"][i].max()) for r in range(2) for i in range(4)}
    assert len(first_pass) == 8
    resumed = PromptBatches(prompts, 4, 2, accum, seed=3)
    resumed.load_state_dict(single.state_dict())
    for _ in range(5):
        a, b = next(single), next(resumed)
        assert (a["rollout"], a["epoch"]) == (b["rollout"], b["epoch"]) and torch.equal(
            a["prompt_tokens"], b["prompt_tokens"]
        )


def test_bad_prompt_records_are_skipped_and_counted(setup):
    root, _ = setup
    _, tok = load_pretrained(root / "policy")
    skipped = SkipCounter()
    prompts = read_prompts(root / "prompts.jsonl", ChatFormat(tok), 40, skipped)
    assert len(prompts) == 8 and skipped.count == 2
    assert skipped.examples[0].endswith("prompts.jsonl:9: not JSON (JSONDecodeError)")
    assert "prompts.jsonl:10: the last message must be a user turn" in skipped.examples[1]
    short = SkipCounter()
    assert (
        len(read_prompts(root / "prompts.jsonl", ChatFormat(tok), 12, short)) < 8
        and "prompt tokens" in short.examples[-1]
    )
    with pytest.raises(ValueError, match="data-parallel only"):
        PPOTask.from_config(load_config(None, overrides(root, root / "x", "--parallel.tp=2")))


def test_rollout_rewards_whiten_scores_and_penalise_unfinished_replies(setup, tmp_path):
    root, _ = setup
    cfg = load_config(
        None, overrides(root, tmp_path, "--ppo.whiten_reward=true", "--ppo.missing_stop_penalty=0.5")
    )
    task = PPOTask.from_config(cfg)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    responses = Responses(None, None, mask, None, finished=torch.tensor([True, False]))
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ro = Rollout(responses, None, ref, scores=torch.tensor([1.0, 3.0]))
    logprobs = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.0, -0.25]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0.4]])
    task._advantages(ro, logprobs, values)
    # scores 1, 3 whitened to −1, +1; the second reply has no stop token: −0.5
    rewards, _ = kl_penalized_rewards(torch.tensor([-1.0, 0.5]), logprobs, ref, mask, cfg.ppo.kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 0.95)
    assert torch.allclose(ro.advantages, whiten(advantages, mask)) and torch.allclose(ro.returns, returns)
    assert ro.scale == 6 / 5 and ro.global_tokens == 5
    assert ro.stats["reward"] == 2.0 and ro.stats["response_tokens"] == 2.5
    assert math.isclose(ro.stats["kl"], ((-0.5 + 1.0) + (0.0 - 0.5 + 0.25)) / 2, abs_tol=1e-6)


# --- through the training loop ------------------------------------------------------------------------------
def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_ppo_learns_the_toy_reward_with_frozen_reference_and_reward(setup, tmp_path):
    root, target = setup
    cfg = load_config(None, overrides(root, tmp_path, "--train.steps=100", "--metrics.log_every=25"))
    task = PPOTask.from_config(cfg)
    assert task.skipped.count == 2
    result = train(cfg, task, show_progress=False)
    model, hist = result.model, task.history
    # the frozen models did not move and the optimizer never saw them
    ref_args, ref_state = load_checkpoint(root / "policy")
    fresh = build_llama(ref_args)
    fresh.load_state_dict(ref_state)
    assert digest(model.reference) == digest(fresh)
    assert digest(model.reward) == digest(load_reward_model(root / "rm")[0])
    trained = {id(p) for _, p in result.runtime.named_trainable_parameters()}
    assert trained.isdisjoint(id(p) for p in [*model.reference.parameters(), *model.reward.parameters()])
    assert digest(model.policy) != digest(fresh)
    # epoch 0: old = current log-probs, the ratio is exactly 1; epoch 1 moved off it
    first, second = [h for h in hist if h["epoch"] == 0], [h for h in hist if h["epoch"] == 1]
    assert len(first) == len(second) == 50
    assert all(h["clip_frac"] == 0.0 and h["approx_kl"] == 0.0 for h in first)
    assert sum(h["approx_kl"] > 0 for h in second) == 50
    # the reward rises (measured: first 3 rollouts 0.33, last 5 1.26; the maximum for 8 " yes" is ~1.27)
    # and the KL to the reference grows from exactly 0 (measured: last 10 rollouts 4.7 nats per response)
    rewards = [h["reward"] for h in first]
    kls = [h["kl"] for h in first]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert start < 0.4 and end > 1.1, (start, end)
    assert kls[0] == 0.0 and sum(kls[-10:]) / 10 > 1.0, kls
    assert [json.loads(line) for line in (tmp_path / "ppo.jsonl").read_text().splitlines()] == hist
    # the export is the policy alone, loadable as a Llama
    out = task.export(result.runtime.full_state_dict(), tmp_path / "export", "meta")
    exported, _ = load_pretrained(out)
    assert digest(exported) == digest(model.policy)


def ppo_history(root, run_dir, extra):
    cfg = load_config(None, overrides(root, run_dir, "--train.steps=2", "--data.batch_size=4",
                                      "--ppo.max_new_tokens=4", *extra))  # fmt: skip
    task = PPOTask.from_config(cfg)
    result = train(cfg, task, show_progress=False)
    return [h["loss"] for h in result.history], task.history


@pytest.mark.multiprocess
def test_fsdp_matches_single_process(setup, tmp_path):
    root, _ = setup
    single_loss, single_hist = ppo_history(root, tmp_path / "a", [])
    fsdp_loss, fsdp_hist = spawn_ranks(ppo_history, 2, root, tmp_path / "b", ["--parallel.dp_shard=2"])[0]
    assert len(single_loss) == len(fsdp_loss) == 2 and single_loss[1] != 0.0
    assert max(abs(a - b) for a, b in zip(single_loss, fsdp_loss)) < 1e-4, (single_loss, fsdp_loss)
    for a, b in zip(single_hist, fsdp_hist, strict=True):
        for key in ("reward", "kl", "response_tokens", "value_loss", "policy_loss", "clip_frac", "approx_kl"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
