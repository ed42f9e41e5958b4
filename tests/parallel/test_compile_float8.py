"""torch.compile per block gives the eager losses; float8 without a Hopper GPU fails clearly."""

import pytest
import torch

from herd.config import load_config
from herd.parallel.activation_checkpoint import apply_float8
from herd.tasks.text import TextPretrainTask
from herd.text import build_llama, get_preset
from herd.trainer import train

BASE = [
    "--model.vocab_subset=true", "--model.args.dim=64", "--model.args.n_layers=2", "--model.args.n_heads=4",
    "--model.args.n_kv_heads=2", "--model.args.multiple_of=16", "--data.synthetic_docs=200", "--data.seq_len=32",
    "--data.batch_size=4", "--train.steps=2", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--train.device=cpu", "--train.eval_every=0", "--checkpoint.save_final=false", "--checkpoint.resume=none",
]  # fmt: skip


def losses(tmp_path, *extra):
    cfg = load_config(None, [f"--train.run_dir={tmp_path}", *BASE, *extra])
    return [h["loss"] for h in train(cfg, TextPretrainTask(cfg), show_progress=False).history]


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", "--parallel.compile=true")
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_float8_without_hopper_gpu_is_a_clear_error():
    model = build_llama(get_preset("tiny", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64))
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        apply_float8(model)
