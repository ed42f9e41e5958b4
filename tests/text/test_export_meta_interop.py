"""Exports that the other side's own tools read: Meta's layout.

llama-models' reference `Transformer` (built from fairscale's model-parallel layers on a one-process gloo
group, as its own `Llama3.build` sets them up) loads herd's Meta export with no missing or unexpected keys
and gives herd's fp32 logits; params.json holds only Meta's keys, with an FFN pair Meta's formula turns
into the checkpoint's width; what Meta's keys cannot say round-trips through herd_params.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.cli import main as convert_main
from herd.text.args import (
    ModelArgs,
    RopeScaling,
    get_preset,
    meta_ffn_params,
    meta_ffn_width,
    meta_max_seq_len,
)
from herd.text.checkpoint_meta import CheckpointError, save_meta_checkpoint
from herd.text.loading import load_model
from herd.text.model import build_llama

transformers = pytest.importorskip("transformers")


# --- params.json ---------------------------------------------------------------------------------------------
def test_params_json_equals_meta_published_files() -> None:
    """herd's presets write exactly the arch args Meta lists for its releases (llama-models' sku_list),
    plus `rope_scaling_factor`, which Llama 3's reference ignores and Llama 4's reads."""
    from llama_models.sku_list import resolve_model

    for preset, sku in [
        ("llama3_8b", "Llama-3-8B"),
        ("llama3_70b", "Llama-3-70B"),
        ("llama3_1_8b", "Llama3.1-8B"),
        ("llama3_1_70b", "Llama3.1-70B"),
        ("llama3_1_405b", "Llama3.1-405B:bf16-mp8"),
        ("llama3_2_1b", "Llama3.2-1B"),
        ("llama3_2_3b", "Llama3.2-3B"),
    ]:
        params = get_preset(preset).to_meta_params()
        params.pop("rope_scaling_factor", None)
        assert params == resolve_model(sku).arch_args, preset


@pytest.mark.parametrize(
    ("dim", "width", "pair"),
    [
        (4096, 14_336, (1024, 1.3)),  # Llama 3 8B
        (8192, 28_672, (4096, 1.3)),  # Llama 3 70B
        (16_384, 53_248, (4096, 1.2)),  # Llama 3.1 405B
        (2048, 8192, (256, 1.5)),  # Llama 3.2 1B
        (4096, 11_008, (256, None)),  # Llama 2 7B
        (256, 896, (128, 1.2)),  # the HF model: the old params.json built 768 rows
        (64, 160, (32, 0.8)),
    ],
)
def test_meta_ffn_params_reproduce_the_width(dim: int, width: int, pair) -> None:
    assert meta_ffn_params(dim, width) == pair
    assert meta_ffn_width(dim, *pair) == width
    assert meta_ffn_width(256, 256, None) == 768  # what the old params.json ({ffn_dim: 896}) built


def test_meta_ffn_params_cover_every_width() -> None:
    g = torch.Generator().manual_seed(0)
    dims = torch.randint(1, 20_000, (3000,), generator=g).tolist()
    widths = torch.randint(1, 80_000, (3000,), generator=g).tolist()
    for dim, width in [*zip(dims, widths), *((d, w) for d in range(1, 40) for w in range(1, 200))]:
        assert meta_ffn_width(dim, *meta_ffn_params(dim, width)) == width, (dim, width)
    with pytest.raises(ValueError, match="must be positive"):
        meta_ffn_params(64, 0)


def test_meta_model_args_accept_params_json() -> None:
    """The line llama-models' `Llama3.build` runs; herd's old params.json (with max_seq_len) made it raise
    TypeError."""
    from llama_models.llama3.args import ModelArgs as MetaArgs

    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, ffn_dim=896)
    params = args.to_meta_params()
    meta = MetaArgs(max_seq_len=64, max_batch_size=2, **params)
    assert meta_ffn_width(meta.dim, meta.multiple_of, meta.ffn_dim_multiplier) == 896
    with pytest.raises(TypeError, match="max_seq_len"):
        MetaArgs(max_seq_len=64, max_batch_size=2, **{**params, "max_seq_len": 128})


def test_max_seq_len_round_trips_and_old_params_json_reads(tmp_path) -> None:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=160, max_seq_len=96,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 64), tie_embeddings=True,
    )  # fmt: skip
    model = build_llama(args)
    save_meta_checkpoint(tmp_path, args, model.state_dict())
    assert json.loads((tmp_path / "herd_params.json").read_text()) == {
        "max_seq_len": 96,
        "tie_embeddings": True,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 64},
    }  # fmt: skip
    toks = torch.randint(0, 300, (1, 90), generator=torch.Generator().manual_seed(1))
    back = load_model(tmp_path)
    assert (back.args.max_seq_len, back.args.rope_scaling, back.args.ffn_hidden_dim) == (
        96,
        args.rope_scaling,
        160,
    )
    assert back.args.tie_embeddings and back.output is None
    with torch.no_grad():
        assert torch.equal(back(toks), model(toks))
    # herd's older params.json: everything inside it, no herd_params.json, no head for a tied model
    old = {
        "dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "multiple_of": 256,
        "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "max_seq_len": 96,
        "ffn_dim": 160, "use_scaled_rope": True, "rope_scaling_factor": 32.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 64},
        "tie_embeddings": True,
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(old))
    (tmp_path / "herd_params.json").unlink()
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del shard["output.weight"]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    assert load_model(tmp_path).args == args
    # Meta's own files carry no context length: the release's (its Hugging Face config's) is used
    assert meta_max_seq_len(get_preset("llama3_1_8b").to_meta_params()) == 131_072
    assert meta_max_seq_len(get_preset("llama3_8b").to_meta_params()) == 8192
    assert meta_max_seq_len({"dim": 4096, "norm_eps": 1e-5, "vocab_size": -1}) == 4096  # Llama 2
    assert meta_max_seq_len({"dim": 4096, "norm_eps": 1e-6, "vocab_size": -1}) == 2048  # Llama 1


def test_bad_herd_params_json_names_the_file(tmp_path) -> None:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=32)
    save_meta_checkpoint(tmp_path, args, build_llama(args).state_dict())
    bad = {
        '{"max_seq_len": "long"}': "max_seq_len must be int",
        '{"max_seq_len": 0}': "max_seq_len must be positive",
        '{"dim": 3}': "unknown key 'dim'",
        '{"rope_scaling": {"factor": 8}}': "rope_scaling needs exactly the keys",
        "[1, 2]": "expected a JSON object",
        "{oops": "invalid JSON",
    }
    for content, msg in bad.items():
        (tmp_path / "herd_params.json").write_text(content)
        with pytest.raises(CheckpointError, match=f"herd_params.json: {re.escape(msg)}"):
            load_model(tmp_path)


# Runs llama-models' reference model in a child process: its loader sets a global default tensor type
# (bf16) and fairscale keeps module-level process-group state, neither of which may leak into pytest.
_META_REFERENCE = r"""
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel
from llama_models.checkpoint import maybe_reshard_state_dict
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer

jobs = json.loads(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
initialize_model_parallel(1)  # what Llama3.build does for WORLD_SIZE=1
report = {}
for name, job in jobs.items():
    ckpt = Path(job["ckpt"])
    params = json.loads((ckpt / "params.json").read_text())
    args = ModelArgs(max_seq_len=job["max_seq_len"], max_batch_size=2, **params)  # Llama3.build's line
    state = maybe_reshard_state_dict(sorted(ckpt.glob("*.pth")), n_kv_heads=args.n_kv_heads)
    torch.set_default_dtype(torch.float32)  # the loader switched the default to bf16; compare in fp32
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tokens = torch.load(job["tokens"])
    logits = model(tokens, start_pos=0)
    torch.save(logits, job["out"])
    report[name] = {"missing": missing, "unexpected": unexpected, "dtype": str(logits.dtype)}
print(json.dumps(report))
"""


def _run_meta_reference(tmp_path: Path, jobs: dict[str, dict]) -> dict[str, dict]:
    pytest.importorskip("fairscale", reason="llama-models' reference model needs fairscale (test extras)")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _META_REFERENCE, json.dumps(jobs), str(tmp_path / "pg")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_meta_reference_model_loads_herd_exports(tmp_path) -> None:
    # 512 positions: Meta's RoPE scaling (original context 8192) changes the low frequencies visibly only
    # this far out; the unscaled control below checks that it is exercised.
    toks = torch.randint(0, 300, (2, 512), generator=torch.Generator().manual_seed(2))
    torch.save(toks, tmp_path / "tokens.pt")
    models, jobs = {}, {}

    def add(name: str, ckpt: Path, model) -> None:
        models[name] = model
        jobs[name] = {
            "ckpt": str(ckpt),
            "tokens": str(tmp_path / "tokens.pt"),
            "out": str(tmp_path / f"{name}.pt"),
        }
        jobs[name]["max_seq_len"] = 512

    # GQA with Llama 3.1 RoPE scaling, two model-parallel shards (Meta's loader merges them)
    torch.manual_seed(0)
    gqa = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                    rope_scaling=RopeScaling(), max_seq_len=512)  # fmt: skip
    model = build_llama(gqa).eval()
    with torch.no_grad():  # sharper attention, so that position matters more in the logits
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(4.0)
            layer.attention.wk.weight.mul_(4.0)
    save_meta_checkpoint(tmp_path / "gqa", gqa, model.state_dict(), num_shards=2)
    add("gqa_scaled", tmp_path / "gqa", model)
    # a transformers Llama with an FFN width off Meta's published rules, through `herd convert`
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
    )  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf896")
    assert (
        convert_main(
            ["convert", "--from", "hf", "--to", "meta", str(tmp_path / "hf896"), str(tmp_path / "m896")]
        )
        == 0
    )
    add("ffn_896", tmp_path / "m896", load_model(tmp_path / "m896"))
    # tied embeddings (Llama 3.2 style): Meta's Transformer still expects output.weight
    torch.manual_seed(2)
    tied = ModelArgs(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=300, multiple_of=64, tie_embeddings=True
    )
    model = build_llama(tied).eval()
    save_meta_checkpoint(tmp_path / "tied", tied, model.state_dict())
    add("tied", tmp_path / "tied", model)
    # negative control: the same weights without RoPE scaling must NOT match
    (tmp_path / "unscaled").mkdir()
    for f in (tmp_path / "gqa").iterdir():
        (tmp_path / "unscaled" / f.name).symlink_to(f)
    (tmp_path / "unscaled" / "params.json").unlink()
    params = json.loads((tmp_path / "gqa" / "params.json").read_text())
    (tmp_path / "unscaled" / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))
    add("unscaled", tmp_path / "unscaled", models["gqa_scaled"])

    report = _run_meta_reference(tmp_path, jobs)
    diffs = {}
    for name, model in models.items():
        assert report[name]["missing"] == [] and report[name]["unexpected"] == [], (name, report[name])
        with torch.no_grad():
            diffs[name] = (torch.load(tmp_path / f"{name}.pt") - model(toks)).abs().max().item()
    assert all(diffs[n] < 1e-5 for n in ("gqa_scaled", "ffn_896", "tied")), diffs
    assert diffs["unscaled"] > 1e-4, diffs
    assert json.loads((tmp_path / "m896" / "params.json").read_text())["multiple_of"] == 128
    with torch.no_grad():  # and the converted model is still transformers' model
        hf_diff = (hf_model(toks).logits - torch.load(tmp_path / "ffn_896.pt")).abs().max().item()
    assert hf_diff < 1e-5, f"Meta reference vs transformers: {hf_diff:.3e}"


def test_tied_flag_with_a_different_head_is_an_error(tmp_path) -> None:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=32, tie_embeddings=True)
    save_meta_checkpoint(tmp_path, args, build_llama(args).state_dict())
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    shard["output.weight"] = shard["output.weight"].clone() + 1.0
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(
        CheckpointError, match="herd_params.json says tie_embeddings but output.weight differs"
    ):
        load_model(tmp_path)
    (tmp_path / "herd_params.json").unlink()  # without the flag: a separate head, read as untied
    assert not load_model(tmp_path).args.tie_embeddings
