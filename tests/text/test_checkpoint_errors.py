"""Bad checkpoints fail with messages that name the file, the key and both shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.text.args import ModelArgs
from herd.text.checkpoint_hf import args_from_hf_config, save_hf_checkpoint
from herd.text.checkpoint_meta import CheckpointError, CheckpointFileMissing, save_meta_checkpoint
from herd.text.loading import convert_checkpoint, detect_format, load_model, model_from_state_dict
from herd.text.model import build_llama


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=128)
    return ModelArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_llama(tiny_args())


def meta_ckpt(path: Path, model, num_shards: int = 1) -> Path:
    save_meta_checkpoint(path, model.args, model.state_dict(), num_shards=num_shards)
    return path


def hf_ckpt(path: Path, model, max_shard_size: str = "5GB") -> Path:
    save_hf_checkpoint(path, model.args, model.state_dict(), max_shard_size=max_shard_size)
    return path


def raises(exc, *fragments: str):
    """pytest.raises matching every fragment literally, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# --- Meta ---------------------------------------------------------------------------------------------------
def test_missing_last_shard_is_named(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model, num_shards=2)
    (tmp_path / "consolidated.01.pth").unlink()
    with raises(CheckpointError, "consolidated.00.pth: tok_embeddings.weight has shape (150, 64)") as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert (
        "params.json implies (300, 64)" in msg and "2-shard" in msg and "consolidated.01.pth missing" in msg
    )


def test_missing_middle_shard_is_named(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model, num_shards=4)
    (tmp_path / "consolidated.02.pth").unlink()
    with raises(CheckpointFileMissing, "consolidated.02.pth missing", "found consolidated.00.pth"):
        load_model(tmp_path)


def test_truncated_meta_shard_names_file(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model, num_shards=2)
    shard = tmp_path / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with raises(CheckpointError, "consolidated.01.pth: could not be read"):
        load_model(tmp_path)


def test_params_json_dims_disagree_with_tensors(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with raises(
        CheckpointError,
        "consolidated.00.pth: layers.0.attention.wk.weight has shape (32, 64) but params.json implies (64, 64)",
    ):
        load_model(tmp_path)


def test_params_json_ffn_disagrees_in_a_shard(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model, num_shards=2)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    ffn = model.args.ffn_hidden_dim
    with raises(
        CheckpointError,
        f"consolidated.00.pth: layers.0.feed_forward.w1.weight has shape ({ffn // 2}, 64)",
        "params.json implies (128, 64) for 1 of 2 shards",
    ):
        load_model(tmp_path)


def test_meta_missing_and_unexpected_keys_listed(tmp_path: Path, model) -> None:
    sd = dict(model.state_dict())
    del sd["layers.1.ffn_norm.weight"]
    sd["layers.1.attention.wqkv.weight"] = torch.zeros(1)
    sd["rope.freqs"] = torch.zeros(8)  # Llama 1/2 carry it: silently dropped, not "unexpected"
    (tmp_path / "params.json").write_text(json.dumps(model.args.to_meta_params()))
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with raises(
        CheckpointError,
        "consolidated.00.pth: missing keys (1): layers.1.ffn_norm.weight",
        "unexpected keys (1): layers.1.attention.wqkv.weight",
    ) as e:
        load_model(tmp_path)
    assert "rope.freqs" not in str(e.value)


def test_replicated_norm_must_agree_across_shards(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model, num_shards=2)
    sd = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1
    torch.save(sd, tmp_path / "consolidated.01.pth")
    with raises(CheckpointError, "consolidated.01.pth: replicated norm.weight differs"):
        load_model(tmp_path)


def test_missing_params_json(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path, model)
    (tmp_path / "params.json").unlink()
    with raises(CheckpointFileMissing, "params.json not found"):
        load_model(tmp_path, format="meta")


# --- Hugging Face ------------------------------------------------------------------------------------------
def test_index_naming_missing_file(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with raises(CheckpointFileMissing, victim.name, "missing", "model.safetensors.index.json maps"):
        load_model(tmp_path)


def test_index_key_absent_from_its_file(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model, max_shard_size="40KB")
    file = sorted(tmp_path.glob("model-*.safetensors"))[0]
    tensors = load_file(file)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, file, metadata={"format": "pt"})
    with raises(CheckpointError, f"{file.name}: model.safetensors.index.json lists {dropped}"):
        load_model(tmp_path)


def test_truncated_safetensors_names_file(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with raises(CheckpointError, "model.safetensors: could not be read"):
        load_model(tmp_path)


def test_config_json_disagrees_with_tensors(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 224}))
    ffn = model.args.ffn_hidden_dim
    with raises(
        CheckpointError,
        f"model.safetensors: model.layers.0.mlp.gate_proj.weight has shape ({ffn}, 64) "
        "but config.json implies (224, 64)",
    ):
        load_model(tmp_path)


def test_hf_missing_and_unexpected_keys(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old transformers: dropped
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with raises(
        CheckpointError,
        "missing keys (1): lm_head.weight",
        "unexpected keys (1): model.layers.0.self_attn.q_proj.bias",
    ):
        load_model(tmp_path)


def test_tied_config_with_a_different_head(tmp_path: Path, model) -> None:
    hf_ckpt(tmp_path, model)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with raises(CheckpointError, "model.safetensors: lm_head.weight differs from model.embed_tokens.weight"):
        load_model(tmp_path)


def test_unsupported_config(tmp_path: Path) -> None:
    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 160}
    with raises(NotImplementedError, "RoPE scaling 'yarn' is not supported"):
        args_from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with raises(NotImplementedError, "attention_bias=True"):
        args_from_hf_config({**base, "attention_bias": True})
    with raises(CheckpointError, "model_type 'mistral' is not a Llama"):
        args_from_hf_config({**base, "model_type": "mistral"})
    # transformers 4.x spelling: top-level rope_theta, rope_scaling with "type".
    old = {
        **base,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0},
    }
    old["rope_scaling"] |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    args = args_from_hf_config(old)
    assert args.rope_theta == 5e5 and args.rope_scaling is not None and args.rope_scaling.factor == 32.0


# --- loading / detection / conversion ------------------------------------------------------------------------
def test_state_dict_shape_mismatch_names_both_shapes(model) -> None:
    sd = dict(model.state_dict())
    sd["layers.0.attention.wq.weight"] = torch.zeros(32, 64)
    with raises(
        CheckpointError, "layers.0.attention.wq.weight has shape (32, 64) but the model expects (64, 64)"
    ):
        model_from_state_dict(model.args, sd)
    del sd["norm.weight"]
    with raises(CheckpointError, "missing keys (1): norm.weight"):
        model_from_state_dict(model.args, sd)


def test_detect_format_and_dcp(tmp_path: Path) -> None:
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    assert detect_format(tmp_path / "dcp") == "dcp"
    with raises(NotImplementedError, "DCP", "not implemented"):
        load_model(tmp_path / "dcp")
    (tmp_path / "empty").mkdir()
    with raises(CheckpointError, "not a checkpoint directory"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nope")


def test_convert_refuses_to_overwrite(tmp_path: Path, model) -> None:
    meta_ckpt(tmp_path / "a", model)
    convert_checkpoint(tmp_path / "a", tmp_path / "b", dst_format="meta", num_shards=4)
    with raises(FileExistsError, "consolidated."):
        convert_checkpoint(tmp_path / "a", tmp_path / "b", dst_format="meta", num_shards=2)
    # With overwrite the stale consolidated.02/03.pth are removed, so the result reads as 2 shards.
    convert_checkpoint(tmp_path / "a", tmp_path / "b", dst_format="meta", num_shards=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pth")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    with raises(ValueError, "same directory"):
        convert_checkpoint(tmp_path / "a", tmp_path / "a", dst_format="meta")
