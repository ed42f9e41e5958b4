"""`torchrun -m herd train text` end to end: two gloo processes, FSDP, export, then load."""

import json
import os
import subprocess
import sys

import pytest

from herd.text.loading import load_model


@pytest.mark.multiprocess
def test_torchrun_train_text_fsdp(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "herd", "train", "text", "--config", "configs/text/tiny.toml",
        f"--train.run_dir={run}", "--train.steps=4", "--parallel.dp_shard=2", "--model.vocab_subset=true",
        "--model.args.dim=64", "--model.args.n_layers=2", "--data.synthetic_docs=300", "--data.seq_len=32",
        "--train.device=cpu", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r][-1] == 4  # rank 0 alone writes metrics
    model = load_model(run / "model")  # the exported, gathered full model
    assert model.args.n_layers == 2
