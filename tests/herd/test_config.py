"""Job configs: TOML + CLI overrides, clear errors, every shipped config valid."""

from pathlib import Path

import pytest

from herd.config import ConfigError, JobConfig, load_config, parse_overrides
from herd.text import get_preset

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").rglob("*.toml"))


def test_overrides_parse_toml_literals_and_both_spellings():
    assert parse_overrides(["--train.steps=5", "--optimizer.betas", "[0.8, 0.9]", "--data.source=jsonl"]) == {
        "train": {"steps": 5},
        "optimizer": {"betas": [0.8, 0.9]},
        "data": {"source": "jsonl"},
    }


def test_load_applies_overrides_over_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 10\n[model]\npreset = "llama3_8b"\n')
    cfg = load_config(f, ["--train.steps=3", "--optimizer.lr=1e-4", "--model.args.n_layers=2"])
    assert cfg.train.steps == 3 and cfg.optimizer.lr == 1e-4 and cfg.model.preset == "llama3_8b"
    assert cfg.model.args == {"n_layers": 2}
    assert cfg.optimizer.betas == (0.9, 0.95)  # paper defaults survive


def test_unknown_key_error_names_file_and_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nstepz = 10\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*train\.stepz"):
        load_config(f)


def test_type_error_names_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        load_config(f)
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("[train\n")
        load_config(tmp_path / "broken.toml")


def test_defaults_without_file():
    assert isinstance(load_config(None), JobConfig)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_builds_its_model_args(path):
    cfg = load_config(path)
    args = get_preset(cfg.model.preset, **cfg.model.args)
    assert cfg.data.seq_len <= args.max_seq_len
    assert cfg.train.steps > 0


def test_shipped_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"quickstart.toml", "text/llama3_8b.toml", "text/llama3_1_405b.toml", "text/tiny.toml"} <= names
