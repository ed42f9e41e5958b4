"""The one decode loop (`herd.text.generation`) against golden tokens.

The goldens were recorded before the refactor from the three loops it replaced — `generate`'s,
rejection sampling's `_sample_group` (herd/sample.py, shared prefix and recompute) and PPO's
`sample_responses` (herd/tasks/ppo_rollout.py) — and from the two wrappers of `generate`
(`generate_with_images`; Ghost Attention's `model_sample_fn` with its `VocabLimited` model), on tiny
seeded random models, greedy and sampled with a seed. The refactor must not move a single token: same
prompts, same seeds → the same tokens, stop tokens, PPO masks and PPO forward-pass shapes.

The goldens live in decode_loop_golden.json beside this file. Regenerate it only when a change of
tokens is intended (and say why in the commit):
    python tests/text/test_decode_loop.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.sample import sample_recompute, sample_shared_prefix
from herd.tasks.ppo_rollout import row_uniforms, sample_responses
from herd.text import build_llama, get_preset
from herd.text.generation import (
    SamplingParams,
    StopRule,
    decode,
    generate,
    left_aligned,
    prefill,
    token_sampler,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STOPS = frozenset(range(3, 128, 9))  # ~11% of the vocabulary: some rows stop, some run to their limit
PARAMS = {  # name → SamplingParams(max_new_tokens, temperature, top_p, seed)
    "greedy": SamplingParams(8, 0.0),
    "top_p": SamplingParams(8, 1.0, 0.9, seed=3),
    "temperature": SamplingParams(8, 0.7, 1.0, seed=4),
}


def tiny_llama(vocab_size: int = 128, max_seq_len: int = 64, seed: int = 0):
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=vocab_size, max_seq_len=max_seq_len)  # fmt: skip
    torch.manual_seed(seed)
    return build_llama(args).eval()


def random_prompts(lengths: list[int], seed: int = 1, vocab_size: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def flat(completions) -> list:
    return [[c.tokens, c.stop_token] for c in completions]


# --- what each caller produces ----------------------------------------------------------------------------
def run_generate() -> dict:
    model = tiny_llama()
    prompts = random_prompts([5, 9, 7])  # decoding starts at 5: rows 1 and 2 are still in their prompts
    return {name: flat(generate(model, prompts, p, STOPS, pad_id=0)) for name, p in PARAMS.items()}


def run_rejection_sampling() -> dict:
    model = tiny_llama()
    prompts = random_prompts([12, 7, 11], seed=2)  # batch_prompts=2: {7, 11} then {12}
    out = {}
    for name, p in PARAMS.items():
        shared = sample_shared_prefix(model, prompts, 3, p, STOPS, pad_id=0, batch_prompts=2)
        out[f"shared_{name}"] = [flat(s) for s in shared]
        recompute = sample_recompute(model, prompts, 3, p, STOPS, pad_id=0, batch_prompts=2)
        out[f"recompute_{name}"] = [flat(s) for s in recompute]
    limited = sample_shared_prefix(model, prompts[:1], 4, SamplingParams(6, 1.5, seed=0), vocab_limit=40)
    out["vocab_limit_40"] = [flat(s) for s in limited]
    return out


def run_ppo() -> dict:
    model = tiny_llama()
    prompts = random_prompts([4, 8, 6], seed=3)
    padded = torch.full((3, 8), 0)  # right-padded (b, P_max)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    out = {}
    for name, temperature in (("t1", 1.0), ("t07", 0.7), ("greedy", 1e-6)):
        calls: list[list[int]] = []

        def step(tokens, cache, start, calls=calls):  # (b, T) → (b, T, V)
            calls.append([tokens.shape[1], start])
            return model(tokens, kv_cache=cache, start_pos=start)

        uniforms = row_uniforms(7, torch.tensor([10, 11, 12]), 6)  # (b, N=6)
        r = sample_responses(step, lambda b, n: model.new_kv_cache(b, n), padded, lens, uniforms,
                             temperature, 100, STOPS, pad_id=0)  # fmt: skip
        out[name] = {
            "tokens": r.tokens.tolist(),
            "positions": r.positions.tolist(),
            "mask": r.mask.tolist(),
            "last_index": r.last_index.tolist(),
            "finished": r.finished.tolist(),
            "calls": calls,  # (T, start_pos) of every forward: the lock-step schedule
        }
    return out


def run_images() -> dict:
    from herd.adapters import MultimodalLlama, generate_with_images
    from herd.vision import VisionEncoder, get_vision_preset

    V = 256
    args = get_preset("tiny", vocab_size=V, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16,
                      max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    llm = build_llama(args)
    vision = VisionEncoder(get_vision_preset("tiny", max_num_tiles=2))
    model = MultimodalLlama(llm, vision, cross_attention_every=2).eval()
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(0.7)
            block.gate_ffwd.fill_(-0.5)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 7, 1, 2, dtype=torch.long)  # (B, T, M, tiles)
    mask[0, :, 0, :] = 1  # row 0 sees both tiles from the start
    mask[1, 3:, 0, 0] = 1  # row 1: tokens 0-2 come before its <|image|>
    batch = {
        "pixel_values": torch.randn(2, 1, 2, 3, 56, 56, generator=g),
        "aspect_ratio_ids": torch.tensor([[2], [1]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]),
        "cross_attention_mask": mask,
    }
    prompts = [[V, 5, 9, 13, 17], [1, 7, 8, V, 10, 11, 12]]
    return {
        name: flat(generate_with_images(model, prompts, **batch, params=p, stop_ids=STOPS))
        for name, p in PARAMS.items()
    }


def run_ghost_attention(root: Path) -> dict:
    from herd.data.curation.ghost_attention import model_sample_fn
    from herd.text.loading import save_text_model
    from herd.text.tokenizer import Tokenizer
    from herd.text.vocab_subset import SubsetTokenizer

    tok = SubsetTokenizer.from_texts(Tokenizer(), ["Always answer as a pirate. Where is Paris? It is big."])
    vocab = -(-tok.vocab_size // 64) * 64  # padded: ids above tok.vocab_size are no tokens
    model = tiny_llama(vocab, max_seq_len=96)
    with torch.no_grad():  # make the padding rows win if they were sampled: the vocabulary cut must hold
        model.output.weight[tok.vocab_size :] = model.output.weight[: vocab - tok.vocab_size] * 4
    save_text_model(model.state_dict(), model.args, tok, root / "policy", "meta")
    sample = model_sample_fn(root / "policy", max_new_tokens=10, temperature=0.9, seed=2)
    dialog = [{"role": "user", "content": "Always answer as a pirate.\nWhere is Paris?"}]
    greedy = model_sample_fn(root / "policy", max_new_tokens=10, temperature=0.0)
    return {"sampled": [sample(dialog), sample(dialog)], "greedy": greedy(dialog)}


# --- goldens (recorded from the loops before the refactor) ------------------------------------------------
GOLDEN_PATH = Path(__file__).with_name("decode_loop_golden.json")
GOLDEN = json.loads(GOLDEN_PATH.read_text()) if GOLDEN_PATH.is_file() else {}


def as_json(x):
    return json.loads(json.dumps(x))  # tuples → lists, as stored


def test_generate_matches_golden():
    assert as_json(run_generate()) == GOLDEN["generate"]


def test_rejection_sampling_matches_golden():
    got = as_json(run_rejection_sampling())
    assert got == GOLDEN["rejection_sampling"]
    for name in PARAMS:  # sharing the prefill moves no token
        assert got[f"shared_{name}"] == got[f"recompute_{name}"]


def test_ppo_rollouts_match_golden():
    got = as_json(run_ppo())
    assert got == GOLDEN["ppo"]
    # lock-step: P_max + N − P_min = 8 + 6 − 4 forward passes, the first over the 4-token shortest prompt
    assert got["t1"]["calls"] == [[4, 0]] + [[1, s] for s in range(4, 13)]


def test_generate_with_images_matches_golden():
    pytest.importorskip("timm")
    assert as_json(run_images()) == GOLDEN["images"]


def test_ghost_attention_sampler_matches_golden(tmp_path):
    assert as_json(run_ghost_attention(tmp_path)) == GOLDEN["ghost_attention"]


# --- the loop's pieces ------------------------------------------------------------------------------------
def test_prefill_runs_the_head_on_the_last_position_only():
    model = tiny_llama()
    tokens = torch.tensor(random_prompts([9, 9]))  # (2, 9)
    seen = []
    hook = model.output.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        last = prefill(model, tokens, model.new_kv_cache(2, 16))  # (2, V)
        full = model(tokens)  # (2, 9, V), no cache
    hook.remove()
    assert seen == [(2, 1, 64), (2, 9, 64)]  # the prefill's head saw one position per row
    assert (last - full[:, -1]).abs().max().item() < 1e-5


def test_lock_step_changes_the_forward_passes_not_the_tokens():
    model = tiny_llama()
    prompts = random_prompts([5, 6])
    greedy = generate(model, prompts, SamplingParams(8, 0.0))
    stops = {c.tokens[1] for c in greedy}  # both rows stop at their second generated token at the latest
    runs = {}
    for lock_step in (False, True):
        tokens, lens = left_aligned(prompts, 6 + 8, pad_id=0, device="cpu")
        calls = []
        hook = model.register_forward_pre_hook(
            lambda m, args, kw, calls=calls: calls.append(kw["start_pos"]), with_kwargs=True
        )
        with torch.no_grad():
            decode(model, tokens, lens, token_sampler(SamplingParams(8)), StopRule(8, stops, lock_step), 0)
        hook.remove()
        runs[lock_step] = (tokens, calls)
    assert torch.equal(runs[False][0], runs[True][0])
    assert runs[True][1] == list(range(5, 13))  # positions 5..12 fed one by one (the prefill picked 5)
    assert len(runs[False][1]) < len(runs[True][1])  # left as soon as both rows were done
    with pytest.raises(ValueError, match="shortest prompt 5"):
        decode(model, tokens, lens, token_sampler(SamplingParams(8)), StopRule(8), 0, start=6)


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        golden = {
            "generate": run_generate(),
            "rejection_sampling": run_rejection_sampling(),
            "ppo": run_ppo(),
            "images": run_images(),
            "ghost_attention": run_ghost_attention(Path(tmp)),
        }
    blocks = []  # one line per case, so that a diff shows which case moved
    for key, cases in golden.items():
        inner = ",\n".join(f"    {json.dumps(name)}: {json.dumps(v)}" for name, v in cases.items())
        blocks.append(f"  {json.dumps(key)}: {{\n{inner}\n  }}")
    GOLDEN_PATH.write_text("{\n" + ",\n".join(blocks) + "\n}\n")
    print(f"wrote {GOLDEN_PATH}")
