"""`herd data curate-sft` with real models: a tiny reward model trained here (`herd train rm`'s task and
export), a tiny herd Llama as judge and as dialog embedder, a tiny Hugging Face BERT as embedder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_workspaces import write_preference_workspace

from herd.config import load_config
from herd.data.curation.sft_curation import curate_sft, load_curation_config, load_models
from herd.data.curation.sft_dedup import HerdEmbedder, HFEmbedder
from herd.data.records import read_jsonl, write_jsonl
from herd.tasks.reward import RewardModelTask, evaluate_ranking
from herd.text.chat_format import ChatFormat, Message
from herd.text.reward_model import load_reward_model
from herd.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_PAIRS = 30
DUPLICATES = [0, 3, 7]  # chosen dialogs of these pairs appear twice (other ids)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny RM trained for 40 steps (a few seconds), exported as `herd train rm` does; dialogs from
    held-out preference pairs: each pair's chosen and rejected reply as two dialogs, plus duplicates."""
    root = write_preference_workspace(tmp_path_factory.mktemp("curate"), 300, 80)
    cfg = load_config(None, [
        f"--model.init_from={root / 'llm'}", f"--rm.train_data={root / 'prefs' / 'train.jsonl'}",
        f"--rm.val_data={root / 'prefs' / 'val.jsonl'}", f"--train.run_dir={root / 'rm_run'}",
        "--data.batch_size=16", "--data.seq_len=96", "--train.eval_every=0", "--metrics.tensorboard=false",
        "--checkpoint.save_final=false", "--checkpoint.resume=none", "--train.device=cpu", "--optimizer.lr=3e-3",
        "--schedule.warmup_steps=5", "--train.steps=40",
    ])  # fmt: skip
    task = RewardModelTask.from_config(cfg)
    result = train(cfg, task, show_progress=False)
    task.export(result.runtime.full_state_dict(), root / "rm", "meta")
    ranking = evaluate_ranking(result.model.eval(), task, task.val_records)
    rows = []
    for i, rec in enumerate(read_jsonl(root / "prefs" / "val.jsonl")[:N_PAIRS]):
        for side in ("chosen", "rejected"):
            rows.append({"id": f"{side[0]}{i}", "messages": [{"role": "user", "content": rec["prompt"]},
                                                             {"role": "assistant", "content": rec[side]}]})  # fmt: skip
    rows += [{**rows[2 * i], "id": f"dup{i}"} for i in DUPLICATES]
    write_jsonl(root / "dialogs.jsonl", rows)
    return root, ranking


def config(root: Path, seed: int = 5):
    return load_curation_config(None, **{
        "seed": seed, "progress": False, "rules": [], "quality.reward_model": str(root / "rm"),
        "judge.model": str(root / "llm"), "judge.temperature": 1.0, "judge.max_new_tokens": 6,
        "judge.batch_size": 32, "dedup.embedder": str(root / "llm"), "dedup.threshold": 0.9999,
        "dedup.n_clusters": 4,
    })  # fmt: skip


def test_curate_sft_with_reward_model_judge_and_embedder(workspace, tmp_path):
    root, ranking = workspace
    rep = curate_sft([root / "dialogs.jsonl"], tmp_path / "a", config(root))
    kept = read_jsonl(tmp_path / "a" / "curated.jsonl")
    rejects = read_jsonl(tmp_path / "a" / "rejects.jsonl")
    n = 2 * N_PAIRS + len(DUPLICATES)
    rows = read_jsonl(root / "dialogs.jsonl")
    assert rep["output_records"] == len(kept) and rep["input_records"] == n == len(rows)
    assert len(kept) + len(rejects) == n and all(r["reason"] == "semantic_duplicate" for r in rejects)
    # the generated set repeats some dialogs (same question and reply) and we planted 3 more copies:
    # exactly one of each group of identical dialogs is kept, the one first by quality × difficulty
    kept_ids = {k["id"] for k in kept}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(json.dumps(r["messages"]), []).append(i)
    assert sum(len(g) > 1 for g in groups.values()) >= len(DUPLICATES)
    for g in groups.values():
        ids = [rows[i]["id"] for i in g]
        # a group may also go whole as a near-copy of another dialog (the random tiny model reads the
        # garbled replies, e.g. "4 is plus 7 3.", as the same as "4 plus 3 is 7.": cosine 0.999999)
        planted = any(i.startswith("dup") for i in ids)
        assert sum(i in kept_ids for i in ids) == 1 if planted else sum(i in kept_ids for i in ids) <= 1, ids
    # and the whole selection equals the greedy walk spelt out here, on embeddings computed here
    from herd.text.loading import load_pretrained

    model, tok = load_pretrained(root / "llm")
    x = HerdEmbedder(model, tok, batch_size=7)([[Message(**m) for m in r["messages"]] for r in rows])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    info = {k["ordinal"]: k for k in rejects}
    for i, r in enumerate(rows):
        if r["id"] in kept_ids:
            info[i] = next(k["curation"] for k in kept if k["id"] == r["id"])
    cluster = [info[i]["cluster"] for i in range(n)]
    priority = [info[i]["priority"] for i in range(n)]
    want: set[str] = set()
    for c in set(cluster):
        chosen: list[int] = []
        for i in sorted((i for i in range(n) if cluster[i] == c), key=lambda i: (-priority[i], i)):
            if all(float(x[i] @ x[j]) < 0.9999 for j in chosen):
                chosen.append(i)
                want.add(rows[i]["id"])
    assert want == kept_ids
    assert rep["stages"]["semantic_dedup"]["removed"] == {"semantic_duplicate": n - len(kept)}

    # RM scores are the model's own reward of each dialog, scored one by one here
    rm, tok = load_reward_model(root / "rm")
    fmt = ChatFormat(tok)
    by_id = {k["id"]: k["curation"] for k in kept} | {r["id"]: r["scores"] for r in rejects}
    for k in kept[:12]:
        ids = fmt.encode_dialog_prompt([Message(**m) for m in k["messages"]], add_generation_prompt=False)
        with torch.no_grad():
            want = float(rm(torch.tensor([ids]), torch.tensor([len(ids) - 1]))[0])
        assert k["curation"]["rm_score"] == pytest.approx(want, abs=1e-5)
    quality = rep["stages"]["quality"]["counts"]
    assert quality["rm_scored"] == n and quality["rm_top_quartile"] == math.ceil(n / 4)
    # the trained RM (held-out pair accuracy 0.67 in the task's own evaluation after 40 steps) prefers the
    # chosen reply in 17 of these 30 pairs (measured); its top quartile holds more chosen than rejected
    right = [by_id[f"c{i}"]["rm_score"] > by_id[f"r{i}"]["rm_score"] for i in range(N_PAIRS)]
    assert ranking["accuracy"] >= 0.6 and sum(right) >= N_PAIRS // 2, (ranking, sum(right))
    top = [i[0] for i, sc in by_id.items() if sc["rm_top_quartile"]]
    assert top.count("c") > top.count("r"), top

    # the untrained tiny judge writes no readable rubric: counted, not guessed
    assert quality["judge_scored"] == n
    assert (
        sum(v for k, v in quality.items() if k.startswith("judge_unparsed"))
        + sum(v for k, v in quality.items() if k.startswith("judge_all_pass"))
        <= n
    )
    difficulty = rep["stages"]["difficulty"]["counts"]
    assert difficulty["judged"] == n

    # deterministic for a seed: the same files again; another seed changes the judge's sampled replies
    again = curate_sft([root / "dialogs.jsonl"], tmp_path / "b", config(root))
    assert (tmp_path / "b" / "curated.jsonl").read_text() == (tmp_path / "a" / "curated.jsonl").read_text()
    assert again["stages"] == rep["stages"]
    judge = load_models(config(root, seed=6))["judge"]
    judge5 = load_models(config(root, seed=5))["judge"]
    prompts = [[Message("user", "Question: what is 1 plus 7?")]] * 4
    assert judge5.ask(prompts) == load_models(config(root, seed=5))["judge"].ask(prompts)
    assert judge.ask(prompts) != judge5.ask(prompts)


def test_herd_embedder_batches_equal_single_dialogs(workspace):
    root, _ = workspace
    from herd.text.loading import load_pretrained

    model, tok = load_pretrained(root / "llm")
    dialogs = [[Message("user", "Question: what is 1 plus 7?"), Message("assistant", "1 plus 7 is " + "8 " * k)]
               for k in range(5)]  # fmt: skip
    batched = HerdEmbedder(model, tok, batch_size=5)(dialogs)
    single = np.concatenate([HerdEmbedder(model, tok, batch_size=1)([d]) for d in dialogs])
    assert batched.shape == (5, 64) and np.abs(batched - single).max() < 1e-5


def test_hf_encoder_embedder(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[", "]", "user", "assistant", "what", "is", "1", "plus",
             "7", "?", "8", "."]  # fmt: skip
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    emb = HFEmbedder(str(tmp_path / "bert"), batch_size=4)
    dialogs = [[Message("user", "what is 1 plus 7 ?"), Message("assistant", "8 ." * k)] for k in range(1, 5)]
    batched = emb(dialogs)
    single = np.concatenate([emb([d]) for d in dialogs])
    # padding is masked out of the mean: a dialog's vector does not depend on its batch
    assert batched.shape == (4, 32) and np.abs(batched - single).max() < 1e-5
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["hidden_size"] == 32
