"""Rejection sampling: the shared-prefix sampler equals `generate` token for token and its logits equal
recomputation; the best-of-K selection, the reward-model scorer, the prompts reader and `herd post sample`."""

import json

import pytest
import torch

from herd.cli import main
from herd.data.records import SkipCounter
from herd.data.training.dialogs import parse_dialog
from herd.sample import (
    RewardModelScorer,
    read_prompts,
    rejection_sample,
    sample_recompute,
    sample_shared_prefix,
)
from herd.text import build_llama, get_preset
from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import SamplingParams, generate
from herd.text.loading import save_text_model
from herd.text.reward_model import RewardModel, load_reward_model, save_reward_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = (
    "What is the capital of France? Tell me a story about a fox and a dog. Paris is big. Why is the sky blue?"
)
STOPS = frozenset(range(3, 128, 9))  # ~11% of the vocabulary: some samples stop, some run out of tokens


def tiny_args(vocab_size=128, max_seq_len=96):
    return get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=vocab_size, max_seq_len=max_seq_len)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_llama(tiny_args()).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


def as_lists(completions):
    return [(c.tokens, c.stop_token) for c in completions]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(10, 0.0), SamplingParams(10, 1.0, 0.9, seed=3), SamplingParams(10, 0.7, 1.0, seed=4)],
    ids=["greedy", "top_p", "temperature"],
)
def test_shared_prefix_equals_generate_on_k_copies(model, params):
    k = 4
    prompts = random_prompts([17, 12, 17])  # one batch of three prompts of different lengths
    shared = sample_shared_prefix(model, prompts, k, params, STOPS, pad_id=0, batch_prompts=3)
    reference = generate(model, [p for p in prompts for _ in range(k)], params, STOPS, pad_id=0)
    assert [as_lists(s) for s in shared] == [as_lists(reference[i * k : (i + 1) * k]) for i in range(3)]
    assert shared == sample_recompute(model, prompts, k, params, STOPS, pad_id=0, batch_prompts=3)
    # batches of one prompt: each prompt alone equals generate on its K copies with the same RNG stream
    single = sample_shared_prefix(model, prompts[:1], k, params, STOPS, pad_id=0)[0]
    assert as_lists(single) == as_lists(generate(model, [prompts[0]] * k, params, STOPS, pad_id=0))
    lengths = {len(c.tokens) for s in shared for c in s}
    if params.temperature > 0:  # the samples differ and the stop path is taken
        assert len({tuple(c.tokens) for c in shared[0]}) > 1
        assert any(c.stop_token is not None for s in shared for c in s) and 10 in lengths


def test_batches_by_length_return_prompts_in_input_order(model):
    params = SamplingParams(6, 1.0, 1.0, seed=7)
    prompts = random_prompts([20, 5, 19, 6])
    batched = sample_shared_prefix(model, prompts, 3, params, batch_prompts=2)  # {5, 6} then {19, 20}
    # the same RNG stream in the same batch order: prompts 1 and 3 first, then 0 and 2
    reference = generate(model, [prompts[i] for i in (1, 3) for _ in range(3)], params)
    assert as_lists(batched[1] + batched[3]) == as_lists(reference)
    greedy = sample_shared_prefix(model, prompts, 2, SamplingParams(6, 0.0), batch_prompts=2)
    for p, got in zip(prompts, greedy):
        assert as_lists(got) == as_lists(generate(model, [p, p], SamplingParams(6, 0.0)))


def test_step_logits_equal_recomputation_without_cache(model):
    prompts = random_prompts([16, 13])
    params = SamplingParams(8, 1.0, 1.0, seed=11)
    logits = []
    out = sample_shared_prefix(model, prompts, 3, params, batch_prompts=2, step_logits=logits)
    rows = [p + c.tokens for p, group in zip(prompts, out) for c in group]  # prompt-major, as decoded
    assert [len(r) for r in rows] == [16 + 8] * 3 + [13 + 8] * 3  # no stop ids: every row runs to its limit
    worst = 0.0
    with torch.no_grad():
        for b, row in enumerate(rows):
            full = model(torch.tensor([row]))[0]  # (T, V), no cache
            for step, step_logit in enumerate(logits):
                pos = 13 + step  # decoding starts after the shortest prompt
                if pos < len(row):
                    worst = max(worst, (step_logit[b] - full[pos - 1]).abs().max().item())
    assert len(logits) == 16 + 8 - 13 and worst < 1e-5, worst


def test_vocab_limit_keeps_samples_below_it(model):
    out = sample_shared_prefix(model, random_prompts([9]), 8, SamplingParams(12, 1.5, seed=0), vocab_limit=40)
    tokens = [t for c in out[0] for t in c.tokens]
    assert len(tokens) == 96 and max(tokens) < 40


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    tok = SubsetTokenizer.from_texts(Tokenizer(), [WORDS])
    vocab = -(-tok.vocab_size // 64) * 64  # padded: rows above tok.vocab_size are not tokens
    torch.manual_seed(0)
    policy = build_llama(tiny_args(vocab, max_seq_len=128)).eval()
    save_text_model(policy.state_dict(), policy.args, tok, root / "policy", "meta")
    torch.manual_seed(1)
    rm = RewardModel(tiny_args(vocab, max_seq_len=64))
    rm.init_weights()
    save_reward_model(rm.eval(), tok, root / "rm")
    return root, tok, policy, rm


def test_rejection_sample_keeps_the_argmax_of_the_reward(chat_setup):
    _, tok, policy, _ = chat_setup

    def count_marked(dialogs):  # reward = how many digits the reply holds (special tokens' names have some)
        return [sum(ch.isdigit() for ch in d[-1].content) for d in dialogs]

    dialogs = [[Message("user", "Why is the sky blue?")],
               [Message("system", "Tell me a story."), Message("user", "a fox and a dog"),
                Message("assistant", "Paris is big."), Message("user", "What is the capital of France?")]]  # fmt: skip
    params = SamplingParams(12, 1.0, 1.0, seed=5)
    records = rejection_sample(policy, tok, count_marked, dialogs, 6, params)
    chat = ChatFormat(tok)
    prompts = [chat.encode_dialog_prompt(d) for d in dialogs]
    samples = sample_shared_prefix(
        policy, prompts, 6, params, tok.stop_ids, tok.pad_id, vocab_limit=tok.vocab_size
    )
    for record, dialog, group in zip(records, dialogs, samples):
        replies = [
            chat.decode_assistant_message(c.tokens + ([c.stop_token] if c.stop_token else [])) for c in group
        ]
        assert record.responses == replies
        want = count_marked([[*dialog, r] for r in replies])
        assert record.rewards == want and len(set(want)) > 1
        assert record.best_index == want.index(max(want))  # the first of equal maxima
        assert record.to_json() == {
            "messages": [*({"role": m.role, "content": m.content} | ({"train": False} if m.role == "assistant" else {})
                           for m in dialog), {"role": "assistant", "content": replies[record.best_index].content}],
            "reward": max(want), "rewards": want, "k": 6, "best_index": record.best_index,
        }  # fmt: skip
        messages, train = parse_dialog(record.to_json())  # what `herd train sft` reads
        assert (messages[-1].role, messages[-1].content) == ("assistant", record.best.content)
        assert train[-1] and (len(train) == 2 or not train[2])


def test_reward_model_scorer_matches_one_dialog_at_a_time(chat_setup):
    _, tok, _, rm = chat_setup
    chat = ChatFormat(tok)
    dialogs = [[Message("user", q), Message("assistant", a)]
               for q, a in [("Why?", "Paris is big."), ("Tell me a story about a fox.", "a dog"), ("Why is the sky blue?", "")]]  # fmt: skip
    long = [Message("user", WORDS), Message("assistant", WORDS)]  # longer than the RM's 64 positions
    scorer = RewardModelScorer(rm, tok, batch_size=2)
    got = scorer([*dialogs, long])
    with torch.no_grad():
        for dialog, reward in zip(dialogs, got):
            ids = chat.encode_dialog_prompt(dialog, add_generation_prompt=False)
            assert ids[-1] == chat.eot_id
            assert abs(rm(torch.tensor([ids]), torch.tensor([len(ids) - 1])).item() - reward) < 1e-5
        ids = chat.encode_dialog_prompt(long, add_generation_prompt=False)[-64:]
        assert abs(rm(torch.tensor([ids]), torch.tensor([63])).item() - got[-1]) < 1e-5
    assert scorer.truncated == 1 and len(set(got)) == 4


def test_read_prompts_skips_and_counts_bad_records(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "Why?"}', "not json", '{"messages": [{"role": "user", "content": "Hi"}]}', "",
             '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
             '{"messages": [{"role": "boss", "content": "Hi"}]}', '{"prompt": ""}', "[1, 2]",
             '{"messages": [{"role": "user", "content": "Hi", "name": "x"}]}']  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    skipped = SkipCounter()
    good = read_prompts(path, skipped)
    assert [w for w, _ in good] == [f"{path}:1", f"{path}:3"]
    assert good[0][1] == [Message("user", "Why?")]
    assert skipped.count == 6 and skipped.examples[0].startswith(f"{path}:2: ")
    assert "last message must be a user turn" in skipped.examples[1]


def test_cli_end_to_end(chat_setup, capsys):
    root, tok, _, _ = chat_setup
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "Why is the sky blue?"}', '{"bad": 1}',
        json.dumps({"messages": [{"role": "system", "content": "Tell me a story."},
                                 {"role": "user", "content": "a fox and a dog"}]}),
        json.dumps({"prompt": WORDS * 5}),  # prompt + new tokens exceed the policy's 128 positions
    ]) + "\n")  # fmt: skip
    out = root / "out" / "best.jsonl"
    argv = ["post", "sample", "--policy", str(root / "policy"), "--reward-model", str(root / "rm"), "--prompts",
            str(prompts), "--out", str(out), "--k", "5", "--max-new-tokens", "10", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["prompts"], summary["skipped"], summary["k"]) == (2, 2, 5)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["k"] == 5 and len(r["rewards"]) == 5 for r in records)
    assert all(r["reward"] == max(r["rewards"]) == r["rewards"][r["best_index"]] for r in records)
    assert summary["mean_best_reward"] == pytest.approx(sum(r["reward"] for r in records) / 2)
    # the kept dialog, re-read from the file, scores what the file says under the loaded reward model
    rm, rm_tok = load_reward_model(root / "rm")
    scorer = RewardModelScorer(rm, rm_tok)
    rescored = scorer([parse_dialog(r)[0] for r in records])
    assert max(abs(a - r["reward"]) for a, r in zip(rescored, records)) < 1e-5
    assert records[1]["messages"][:2] == [{"role": "system", "content": "Tell me a story."},
                                          {"role": "user", "content": "a fox and a dog"}]  # fmt: skip
