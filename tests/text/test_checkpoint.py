"""Checkpoint interop: transformers parity, Meta ⇄ HF round trips, Meta model-parallel shards, CLI."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from herd.cli import main as convert_main
from herd.text.args import ModelArgs, RopeScaling
from herd.text.checkpoint_hf import load_hf_checkpoint, permute_from_hf, permute_to_hf
from herd.text.checkpoint_meta import load_meta_checkpoint, save_meta_checkpoint
from herd.text.loading import convert_checkpoint, detect_format, load_model
from herd.text.model import build_llama

transformers = pytest.importorskip("transformers")

VOCAB = 300
SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def hf_config(rope_theta: float, rope_scaling: dict | None = None, **kw):
    """A LlamaConfig built the way the installed transformers wants its RoPE fields."""
    params = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        rope = {"rope_type": "llama3", **rope_scaling} if rope_scaling else {"rope_type": "default"}
        kw["rope_parameters"] = {**rope, "rope_theta": rope_theta}
    else:
        kw["rope_theta"] = rope_theta
        kw["rope_scaling"] = {"rope_type": "llama3", **rope_scaling} if rope_scaling else None
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    base.update(max_position_embeddings=256, bos_token_id=7, eos_token_id=9)
    return transformers.LlamaConfig(**{**base, **kw})


VARIANTS = {
    # Llama 3.1-style: GQA, llama3 RoPE scaling, untied, an FFN width off Meta's rounding rule.
    "gqa_scaled": dict(
        rope_theta=500_000.0,
        rope_scaling=SCALING,
        num_key_value_heads=2,
        intermediate_size=160,
        rms_norm_eps=1e-5,
    ),
    # Llama 3.2-style: tied embeddings.
    "tied": dict(
        rope_theta=500_000.0,
        rope_scaling=SCALING,
        num_key_value_heads=2,
        intermediate_size=160,
        tie_word_embeddings=True,
    ),
    # Llama 2-style: MHA, no scaling, theta 1e4, FFN width on Meta's rule (multiple_of 256).
    "mha_llama2": dict(rope_theta=10_000.0, num_key_value_heads=4, intermediate_size=256, rms_norm_eps=1e-6),
}


def make_hf(path: Path, variant: str, seed: int = 0, **save_kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**VARIANTS[variant])).eval()
    model.save_pretrained(path, **save_kw)
    return model


def tokens(seed: int = 1, batch: int = 2, length: int = 80) -> torch.Tensor:
    # 80 > original_max_position_embeddings (64): positions where the llama3 scaling matters most.
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(hf_model, ours, toks: torch.Tensor) -> float:
    return (hf_model(toks).logits - ours(toks)).abs().max().item()


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- transformers parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path: Path, variant: str) -> None:
    hf = make_hf(tmp_path, variant)
    ours = load_model(tmp_path)
    assert detect_format(tmp_path) == "hf"
    assert ours.args.tie_embeddings == (variant == "tied")
    assert (ours.output is None) == (variant == "tied")
    assert ours.args.n_kv_heads == VARIANTS[variant]["num_key_value_heads"]
    assert ours.args.ffn_hidden_dim == VARIANTS[variant]["intermediate_size"]
    assert (ours.args.rope_scaling is None) == (variant == "mha_llama2")
    diff = max_diff(hf, ours, tokens())
    assert diff < 1e-5, f"{variant}: max |logits diff| = {diff:.3e}"


def test_parity_is_sensitive_to_rope_scaling_and_permutation(tmp_path: Path) -> None:
    """Negative controls: the 1e-5 parity above would fail without the scaling or the q/k permutation."""
    hf = make_hf(tmp_path, "gqa_scaled")
    args, sd = load_hf_checkpoint(tmp_path)
    from herd.text.loading import model_from_state_dict

    unscaled = model_from_state_dict(dataclasses.replace(args, rope_scaling=None), sd)
    assert max_diff(hf, unscaled, tokens()) > 1e-3
    raw = dict(sd)
    for name in list(raw):
        if name.endswith(("wq.weight", "wk.weight")):
            heads = args.n_heads if "wq" in name else args.n_kv_heads
            raw[name] = permute_to_hf(raw[name], heads)  # i.e. loaded without undoing HF's permutation
    assert max_diff(hf, model_from_state_dict(args, raw), tokens()) > 1e-3


def test_llama2_ffn_recovers_meta_rounding(tmp_path: Path) -> None:
    make_hf(tmp_path, "mha_llama2")
    args, _ = load_hf_checkpoint(tmp_path)
    assert (args.ffn_dim, args.multiple_of, args.ffn_dim_multiplier) == (None, 256, None)
    assert args.rope_theta == 10_000.0 and args.norm_eps == 1e-6


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    hf = make_hf(tmp_path, "gqa_scaled", max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    diff = max_diff(hf, load_model(tmp_path), tokens())
    assert diff < 1e-5, f"sharded: max |logits diff| = {diff:.3e}"


def test_permutation_is_a_bijection_per_head() -> None:
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).view(8 * 16, 3)
    hf = permute_to_hf(w, 8)
    assert torch.equal(permute_from_hf(hf, 8), w)
    assert not torch.equal(hf, w)
    # head 0 of Meta pairs rows (0, 1); HF puts them at rows 0 and hd/2 = 8.
    assert torch.equal(hf[8], w[1]) and torch.equal(hf[1], w[2])


# --- round trips -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["gqa_scaled", "tied"])
def test_hf_meta_hf_round_trip_is_bit_exact(tmp_path: Path, variant: str) -> None:
    src, meta, back = tmp_path / "src", tmp_path / "meta", tmp_path / "back"
    hf = make_hf(src, variant)
    r1 = convert_checkpoint(src, meta, dst_format="meta")
    r2 = convert_checkpoint(meta, back, dst_format="hf", max_shard_size="30KB")
    assert (r1.src_format, r2.src_format) == ("hf", "meta")
    assert (
        r1.num_params
        == r2.num_params
        == sum(p.numel() for p in hf.model.parameters())
        + (0 if variant == "tied" else hf.lm_head.weight.numel())
    )
    a, b = hf_tensors(src), hf_tensors(back)
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in b) == (variant != "tied")
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors changed by the round trip: {unequal}"
    assert (back / "model.safetensors.index.json").is_file()
    assert "generation_config.json" in r1.copied and (back / "generation_config.json").is_file()

    c1 = transformers.LlamaConfig.from_pretrained(src).to_dict()
    c2 = transformers.LlamaConfig.from_pretrained(back).to_dict()
    fields = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "head_dim",
    ]
    changed = {f: (c1.get(f), c2.get(f)) for f in fields if c1.get(f) != c2.get(f)}
    assert not changed, f"config fields changed: {changed}"
    assert str(c2.get("dtype") or c2.get("torch_dtype")).endswith("float32")
    # transformers itself loads the converted checkpoint to the same logits.
    again = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(again(tokens()).logits, hf(tokens()).logits)


def test_meta_checkpoint_from_hf_matches_transformers(tmp_path: Path) -> None:
    hf = make_hf(tmp_path / "hf", "gqa_scaled")
    convert_checkpoint(tmp_path / "hf", tmp_path / "meta", dst_format="meta", num_shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    # Meta's keys only: the 160-row FFN as the (multiple_of, multiplier) pair Meta's formula turns into 160.
    assert (params["multiple_of"], params["ffn_dim_multiplier"]) == (32, 0.8) and "ffn_dim" not in params
    assert params["use_scaled_rope"] and params["n_kv_heads"] == 2
    extra = json.loads((tmp_path / "meta" / "herd_params.json").read_text())
    assert extra["rope_scaling"]["original_max_position"] == 64 and extra["max_seq_len"] == 256
    ours = load_model(tmp_path / "meta")
    assert ours.args.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    diff = max_diff(hf, ours, tokens())
    assert diff < 1e-5, f"meta (2 shards): max |logits diff| = {diff:.3e}"


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=128
    )
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize(("num_shards", "split"), [(2, "vocab"), (4, "vocab"), (2, "dim"), (4, "dim")])
def test_meta_multi_shard_write_merge(tmp_path: Path, num_shards: int, split: str) -> None:
    torch.manual_seed(0)
    args = tiny_args(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    sd = build_llama(args).state_dict()
    files = save_meta_checkpoint(tmp_path, args, sd, num_shards=num_shards, embedding_split=split)
    files = [f for f in files if f.suffix == ".pth"]  # after params.json and herd_params.json
    assert [f.name for f in files] == [f"consolidated.{i:02d}.pth" for i in range(num_shards)]
    shards = [torch.load(f, weights_only=True) for f in files]
    s0 = shards[0]
    hd, ffn = args.head_dim, args.ffn_hidden_dim
    assert s0["layers.0.attention.wq.weight"].shape == (64 // num_shards, 64)
    assert s0["layers.0.attention.wo.weight"].shape == (64, 64 // num_shards)
    assert s0["layers.1.feed_forward.w1.weight"].shape == (ffn // num_shards, 64)
    assert s0["layers.1.feed_forward.w2.weight"].shape == (64, ffn // num_shards)
    assert s0["output.weight"].shape == (VOCAB // num_shards, 64)
    want_emb = (VOCAB // num_shards, 64) if split == "vocab" else (VOCAB, 64 // num_shards)
    assert s0["tok_embeddings.weight"].shape == want_emb
    assert s0["norm.weight"].shape == (64,)
    # 2 KV heads: over 4 ranks each head sits on 2 consecutive ranks (Meta's MP > n_kv_heads layout).
    assert s0["layers.0.attention.wk.weight"].shape == (max(2 // num_shards, 1) * hd, 64)
    if num_shards == 4:
        assert torch.equal(
            shards[0]["layers.0.attention.wk.weight"], shards[1]["layers.0.attention.wk.weight"]
        )
    # Each file holds only its own slice (a saved view would drag the whole storage along).
    sizes = [f.stat().st_size for f in files]
    assert max(sizes) < sum(t.numel() * 4 for t in sd.values()) / num_shards * 1.6

    args2, merged = load_meta_checkpoint(tmp_path)
    assert args2 == args
    assert sorted(merged) == sorted(sd)
    unequal = [k for k in sd if not torch.equal(sd[k], merged[k])]
    assert not unequal, f"{num_shards} shards ({split}): merge changed {unequal}"


def test_llama2_params_json_vocab_minus_one(tmp_path: Path) -> None:
    """Llama 1/2 params.json: vocab_size -1 (taken from the tensors) and no rope_theta (10000)."""
    torch.manual_seed(0)
    args = tiny_args(n_kv_heads=4, rope_theta=10_000.0)
    model = build_llama(args)
    save_meta_checkpoint(tmp_path, args, model.state_dict(), num_shards=2, embedding_split="dim")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_model(tmp_path)
    assert loaded.args.vocab_size == VOCAB and loaded.args.rope_theta == 10_000.0
    toks = tokens(length=40)
    with torch.no_grad():
        diff = (model(toks) - loaded(toks)).abs().max().item()
    assert diff == 0.0, f"max |logits diff| = {diff:.3e}"


def test_load_model_dtype_and_rope_buffers(tmp_path: Path) -> None:
    make_hf(tmp_path, "gqa_scaled")
    model = load_model(tmp_path, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(b.is_meta for b in model.buffers())
    ref = build_llama(model.args)
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    assert not model.training


def test_cli_convert_copies_tokenizer_files_and_casts(tmp_path: Path, capsys) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf(src, "gqa_scaled")
    (src / "original").mkdir()
    (src / "original" / "tokenizer.model").write_bytes(b"fake tokenizer")
    (src / "tokenizer_config.json").write_text("{}")
    rc = convert_main(
        ["convert", "--from", "hf", "--to", "meta", str(src), str(dst), "--num-shards", "2"]
        + ["--dtype", "bf16"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "hf → meta" in out and "124,736" in out  # params of the gqa_scaled variant
    assert (dst / "tokenizer.model").read_bytes() == b"fake tokenizer"
    assert (dst / "tokenizer_config.json").is_file() and (dst / "generation_config.json").is_file()
    assert detect_format(dst) == "meta"
    args, sd = load_meta_checkpoint(dst)
    _, ref = load_hf_checkpoint(src)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert all(torch.equal(sd[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_load_pretrained_returns_model_and_tokenizer(tmp_path: Path) -> None:
    """No tokenizer file and the Llama 3 vocabulary: the default Llama 3 tokenizer stands in."""
    tokenizer_mod = pytest.importorskip("herd.text.tokenizer")
    from herd.text.loading import load_pretrained

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=128_256, multiple_of=16, tie_embeddings=True)
    args.max_seq_len = 64
    torch.manual_seed(0)
    save_meta_checkpoint(tmp_path, args, build_llama(args).state_dict())
    model, tok = load_pretrained(tmp_path)
    assert isinstance(tok, tokenizer_mod.Tokenizer)
    ids = tok.encode("The herd of llamas", bos=True, eos=False)
    assert tok.decode(ids[1:]) == "The herd of llamas"
    assert model(torch.tensor([ids])).shape == (1, len(ids), 128_256)


def test_meta_tied_model_without_herd_params(tmp_path: Path) -> None:
    """Meta's params.json has no tie flag. Its tied releases (Llama 3.2) store the head as a copy of the
    embedding, older herd exports stored no head: both read back as tied without herd_params.json."""
    torch.manual_seed(0)
    args = tiny_args(tie_embeddings=True)
    model = build_llama(args)
    save_meta_checkpoint(tmp_path, args, model.state_dict(), num_shards=2)
    assert "tie_embeddings" not in json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "herd_params.json").unlink()
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])  # Meta's layout
    toks = tokens(length=40)
    for layout in ("head copy", "no head"):
        if layout == "no head":
            for f in tmp_path.glob("consolidated.*.pth"):
                sd = torch.load(f, weights_only=True)
                del sd["output.weight"]
                torch.save(sd, f)
        loaded = load_model(tmp_path)
        assert loaded.args.tie_embeddings and loaded.output is None, layout
        with torch.no_grad():
            assert torch.equal(model(toks), loaded(toks)), layout
