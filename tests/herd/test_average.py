"""Checkpoint averaging: per-tensor parity with a manual weighted mean, dtypes, errors, the CLI."""

import shutil

import pytest
import torch

from herd.average import average_checkpoints, normalized_weights
from herd.cli import main
from herd.text import build_llama, get_preset
from herd.text.checkpoint_hf import save_hf_checkpoint
from herd.text.checkpoint_meta import CheckpointError, save_meta_checkpoint
from herd.text.loading import load_checkpoint, load_pretrained, model_from_state_dict, save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(**overrides):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=320, max_seq_len=64)
    return get_preset("tiny", **{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return SubsetTokenizer.from_texts(Tokenizer(), ["the quick brown fox jumps over the lazy dog 0123"])


def make_checkpoint(root, name, tokenizer, seed, fmt="meta", dtype=None, **overrides):
    torch.manual_seed(seed)
    args = tiny_args(**overrides)
    state = build_llama(args).state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if fmt == "meta":
        return save_text_model(state, args, tokenizer, root / name, fmt)
    # herd refuses to export a trimmed vocabulary for transformers (docs/checkpoints.md); averaging still
    # reads the Hugging Face weights layout, so write it directly, with herd's own tokenizer files
    save_hf_checkpoint(root / name, args, state, overwrite=True)
    tokenizer.save(root / name)
    shutil.copy2(tokenizer.base.path, root / name / "tokenizer.model")
    return root / name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("avg")
    # the second one in Hugging Face layout: the average reads either
    return [
        make_checkpoint(root, "a", tokenizer, 0),
        make_checkpoint(root, "b", tokenizer, 1, fmt="hf"),
        make_checkpoint(root, "c", tokenizer, 2),
    ]


def manual_average(paths, weights):
    states = [load_checkpoint(p)[1] for p in paths]
    total = sum(weights)
    return {k: sum(w / total * s[k].float() for w, s in zip(weights, states)) for k in states[0]}


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0], [0.0, 1.0, 1.0]])
def test_average_equals_manual_weighted_mean(checkpoints, weights):
    args, state = average_checkpoints(checkpoints, weights)
    assert args == load_checkpoint(checkpoints[0])[0]
    want = manual_average(checkpoints, weights or [1.0, 1.0, 1.0])
    assert state.keys() == want.keys()
    for k, v in state.items():
        assert v.dtype == torch.float32
        assert (v - want[k]).abs().max().item() < 1e-6, k
    # the average really moved: it differs from every input
    a = load_checkpoint(checkpoints[0])[1]["layers.0.attention.wq.weight"]
    assert (state["layers.0.attention.wq.weight"] - a).abs().max().item() > 1e-3


def test_average_of_one_checkpoint_is_that_checkpoint(checkpoints):
    _, state = average_checkpoints(checkpoints[:1])
    original = load_checkpoint(checkpoints[0])[1]
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_bf16_storage_is_preserved_and_averaged_in_fp32(tmp_path, tokenizer):
    paths = [
        make_checkpoint(tmp_path, n, tokenizer, s, dtype=torch.bfloat16) for n, s in (("x", 3), ("y", 4))
    ]
    _, state = average_checkpoints(paths)
    sa, sb = (load_checkpoint(p)[1] for p in paths)
    for k, v in state.items():
        assert v.dtype == torch.bfloat16
        # halving is exact, so fp32 (a + b) / 2 rounds to bf16 once: bit-identical
        assert torch.equal(v, ((sa[k].float() + sb[k].float()) * 0.5).to(torch.bfloat16)), k


def test_mismatched_architecture_names_field_and_file(tmp_path, tokenizer):
    a = make_checkpoint(tmp_path, "a", tokenizer, 0)
    deeper = make_checkpoint(tmp_path, "deeper", tokenizer, 0, n_layers=3)
    with pytest.raises(CheckpointError, match=r"deeper/params\.json: .*n_layers = 3, expected 2"):
        average_checkpoints([a, deeper])
    hf_wider = make_checkpoint(tmp_path, "wider", tokenizer, 0, fmt="hf", dim=128)
    with pytest.raises(CheckpointError, match=r"wider/config\.json: .*dim = 128, expected 64"):
        average_checkpoints([a, hf_wider])
    tied = make_checkpoint(tmp_path, "tied", tokenizer, 0, tie_embeddings=True)  # no output.weight
    with pytest.raises(CheckpointError, match="tie_embeddings = True"):
        average_checkpoints([a, tied])


def test_mismatched_keys_and_vocabularies_are_named(tmp_path, tokenizer):
    a = make_checkpoint(tmp_path, "a", tokenizer, 0)
    args, state = load_checkpoint(a)
    bad = tmp_path / "extra"
    save_meta_checkpoint(bad, args, state)
    shard = torch.load(bad / "consolidated.00.pth", weights_only=True)
    shard["lora.weight"] = torch.zeros(2)
    torch.save(shard, bad / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: unexpected keys.*lora\.weight"):
        average_checkpoints([a, bad])
    other_tok = SubsetTokenizer.from_texts(Tokenizer(), ["completely different words here"])
    other = make_checkpoint(tmp_path, "other", other_tok, 1)
    with pytest.raises(CheckpointError, match=r"other/vocab_subset\.json: token ids differ"):
        average_checkpoints([a, other])


def test_bad_weights_are_rejected():
    assert normalized_weights([1, 3], 2) == [0.25, 0.75]
    for weights, msg in (([1.0, -1.0], ">= 0"), ([0.0, 0.0], "all be zero"), ([1.0], "1 weights for 2")):
        with pytest.raises(ValueError, match=msg):
            normalized_weights(weights, 2)
    with pytest.raises(ValueError, match="finite"):
        normalized_weights([float("nan"), 1.0], 2)


def test_cli_writes_a_checkpoint_load_pretrained_reads(checkpoints, tokenizer, tmp_path, capsys):
    out = tmp_path / "avg"
    assert (
        main(["post", "average", *map(str, checkpoints), "--out", str(out), "--weights", "1", "1", "2"]) == 0
    )
    assert "herd average" in capsys.readouterr().out
    model, tok = load_pretrained(out)
    assert isinstance(tok, SubsetTokenizer) and tok.keep_ids == tokenizer.keep_ids
    args = load_checkpoint(checkpoints[0])[0]
    want = model_from_state_dict(args, manual_average(checkpoints, [1, 1, 2]))
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - want(tokens)).abs().max().item()
    assert diff < 1e-5, diff
    with pytest.raises(SystemExit, match="one of the inputs"):
        main(["post", "average", str(checkpoints[0]), str(out), "--out", str(out)])


def test_reward_model_exports_average_with_their_score_head(tmp_path, tokenizer, checkpoints):
    from herd.text.reward_model import RewardModel, load_reward_model, save_reward_model

    models = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        rm = RewardModel(tiny_args())
        rm.init_weights()
        save_reward_model(rm, tokenizer, tmp_path / f"rm{seed}")
        models.append(rm)
    out = tmp_path / "rm-avg"
    assert main(["post", "average", str(tmp_path / "rm5"), str(tmp_path / "rm6"), "--out", str(out)]) == 0
    loaded, tok = load_reward_model(out)
    assert tok.keep_ids == tokenizer.keep_ids
    want = RewardModel(tiny_args())
    sa, sb = (m.state_dict() for m in models)
    want.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})
    tokens = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))
    last = torch.tensor([11, 5, 8])
    with torch.no_grad():
        got, ref, one = loaded(tokens, last), want.eval()(tokens, last), models[0].eval()(tokens, last)
    assert (got - ref).abs().max().item() < 1e-5
    assert (got - one).abs().max().item() > 1e-3  # the average is neither input
    with pytest.raises(CheckpointError, match="is a plain checkpoint but .* is a reward model export"):
        average_checkpoints([tmp_path / "rm5", checkpoints[0]])
