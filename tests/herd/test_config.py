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


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("--parallel.pp_schedule=DualPipe", "parallel.pp_schedule", "DualPipe"),
        ("--parallel.activation_checkpoint=some", "parallel.activation_checkpoint", "some"),
        ("--train.dtype=fp16", "train.dtype", "fp16"),
        ("--model.preset=llama5_1t", "model.preset", "llama5_1t"),
        ("--model.init=lazy", "model.init", "lazy"),
        ("--data.source=csv", "data.source", "csv"),
        ("--schedule.decay=step", "schedule.decay", "step"),
        ("--checkpoint.export_format=gguf", "checkpoint.export_format", "gguf"),
        ("--vision.objective=vqa", "vision.objective", "vqa"),
        ("--vision.encoder=vit_g14", "vision.encoder", "vit_g14"),
        ("--rm.margin=huge", "rm.margin", "huge"),
        ("--ppo.value_init=random", "ppo.value_init", "random"),
    ],
)
def test_a_choice_is_checked_when_the_config_loads(override, key, value):
    """Choice-valued options are Literal-typed: the error names the key, the value and the choices."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"{key}: {value!r} is not one of" in message
    choices = message.split("is not one of ")[1].split(", ")
    assert len(choices) >= 2 and value not in choices


def test_a_choice_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="train.dtype: 16 is not one of fp32, bf16"):
        load_config(None, ["--train.dtype=16"])


def test_each_objective_has_its_own_section_and_the_old_post_section_says_where_it_went(tmp_path):
    cfg = load_config(
        None, ["--sft.train_data=a.jsonl", "--rm.margin=small", "--dpo.beta=0.5", "--ppo.epochs=2"]
    )
    assert (cfg.sft.train_data, cfg.rm.margin, cfg.dpo.beta, cfg.ppo.epochs) == ("a.jsonl", "small", 0.5, 2)
    assert cfg.rm.train_data is None  # sections share no field
    f = tmp_path / "old.toml"
    f.write_text('[post]\ntrain_data = "p.jsonl"\n')
    with pytest.raises(
        ConfigError, match=r"old\.toml: the \[post\] section was split .*\[sft\], \[rm\], \[dpo\]"
    ):
        load_config(f)


def test_a_task_gets_only_its_sections():
    """herd.task.TaskBase.from_config passes a task the sections it names, nothing else."""
    from herd.task import task_class

    for name, sections in {"text": ("model", "data"), "sft": ("model", "data", "sft"), "vision": ("vision", "data"),
                           "rm": ("model", "data", "rm", "parallel"), "dpo": ("model", "data", "dpo"),
                           "ppo": ("model", "data", "ppo", "train", "metrics")}.items():  # fmt: skip
        assert task_class(name).sections == sections, name
