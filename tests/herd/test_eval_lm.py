"""`herd eval lm`: a herd model trained here on successor facts, scored by lm-evaluation-harness through the
`herd` model class on local tasks, offline; then the same checkpoint in Hugging Face layout through
lm-eval's own `hf` model class gives the same log-likelihoods, generations and accuracies."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

pytest.importorskip("lm_eval")
from eval_workspace import export_full_vocabulary, successor_facts, train_successor_model, write_tasks  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from herd.cli import main  # noqa: E402
from herd.evaluation.lm_harness import OFFLINE_ENV, HerdLM, offline, run_lm_eval  # noqa: E402

CHANCE_MC = 0.25


@pytest.fixture(scope="module")
def network_attempts(monkeypatch_module):
    """Every outbound connection attempt during the module, refused and recorded."""
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch_module.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, network_attempts):
    """(root, trained model folder, tasks folder, `herd eval lm` report on both tasks)."""
    root = tmp_path_factory.mktemp("eval")
    model = train_successor_model(root)
    tasks = write_tasks(root)
    code = main(["eval", "lm", "--model", str(model), "--tasks", str(tasks / "arith_mc.yaml"),
                 "--tasks", str(tasks / "arith_gen.yaml"), "--out", str(root / "herd_eval")])  # fmt: skip
    assert code == 0
    return root, model, tasks, json.loads((root / "herd_eval" / "results.json").read_text())


def test_offline_sets_every_hub_switch_and_restores_them(monkeypatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with offline():
        assert all(os.environ[k] == v for k, v in OFFLINE_ENV.items())
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ


def _samples(folder, task):
    return [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]


def test_herd_model_scores_well_above_chance_offline(workspace, network_attempts) -> None:
    root, _, _, results = workspace
    assert results["results"]["arith_mc"]["acc,none"] >= CHANCE_MC + 0.65
    assert results["results"]["arith_gen"]["exact_match,strip"] >= 0.8  # chance ~0 (50 possible numbers)
    assert results["n-samples"]["arith_mc"]["effective"] == 40
    # per-document records: the prompt the harness built and herd's answer to it
    gen = _samples(root / "herd_eval", "arith_gen")
    assert gen[3]["arguments"][0][0] == successor_facts()[3].prompt
    assert gen[3]["filtered_resps"] == ["4"]
    assert network_attempts == []  # nothing tried to reach a hub


def test_loglikelihood_equals_direct_forward(workspace) -> None:
    """The harness's requests, scored by hand with one unbatched forward pass of the herd model."""
    root, model_dir, _, _ = workspace
    lm = HerdLM(pretrained=str(model_dir), batch_size=3)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(
        [("Question: what comes after 7? Answer:", " 8"), ("Question: what comes after 7? Answer: ", "9."),
         ("", "Question: what"), ("Question: what comes after 12? Answer:", " 13. Question")])]  # fmt: skip
    got = lm.loglikelihood(reqs)
    tok, model = lm.tokenizer, lm.model
    for (ctx, cont), (logprob, greedy) in zip([r.args for r in reqs], got):
        ctx_s = ctx.rstrip()
        cont_s = ctx[len(ctx_s) :] + cont
        ctx_ids = tok.encode(ctx_s, bos=True) if ctx_s else [tok.bos_id]
        whole = tok.encode(ctx_s + cont_s, bos=True) if ctx_s else [tok.bos_id] + tok.encode(cont_s)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0]  # (T, V)
        targets = whole[len(ctx_ids) :]
        rows = logp[len(ctx_ids) - 1 :]
        assert logprob == pytest.approx(sum(rows[i, t].item() for i, t in enumerate(targets)), abs=1e-5)
        assert greedy == all(rows[i].argmax().item() == t for i, t in enumerate(targets))
    assert got[0][1] and got[0][0] > -0.5  # the model knows 7 → 8
    assert not got[1][1]


@pytest.fixture(scope="module")
def hf_runs(workspace):
    """The checkpoint under the full vocabulary in HF layout, evaluated by herd and by lm-eval's `hf`."""
    from lm_eval.models.huggingface import HFLM

    root, model_dir, tasks, _ = workspace
    hf_dir = export_full_vocabulary(model_dir, root / "hf_model")
    tasks_args = [str(tasks / "arith_mc.yaml"), str(tasks / "arith_gen.yaml")]
    herd_lm = HerdLM(pretrained=str(hf_dir), batch_size=8)
    herd = run_lm_eval(hf_dir, tasks_args, root / "herd_on_hf", lm=herd_lm)
    hf_lm = HFLM(pretrained=str(hf_dir), add_bos_token=True, device="cpu", dtype="float32", batch_size=8)
    hf = run_lm_eval(hf_dir, tasks_args, root / "hf_on_hf", lm=hf_lm)
    return root, herd, hf, herd_lm, hf_lm


def test_hf_export_through_lm_eval_hf_matches_herd(hf_runs, workspace) -> None:
    root, herd, hf, _, _ = hf_runs
    herd_mc, hf_mc = _samples(root / "herd_on_hf", "arith_mc"), _samples(root / "hf_on_hf", "arith_mc")
    assert len(herd_mc) == len(hf_mc) == 40
    worst = 0.0
    for a, b in zip(herd_mc, hf_mc):
        assert a["arguments"] == b["arguments"]
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            worst = max(worst, abs(float(lp_a) - float(lp_b)))
            assert greedy_a == greedy_b
    assert worst < 1e-4, worst
    assert herd.metrics["arith_mc"]["acc,none"] == hf.metrics["arith_mc"]["acc,none"]
    # the zero rows of the widened vocabulary change no ranking: the trimmed model's accuracy too
    assert herd.metrics["arith_mc"]["acc,none"] == workspace[3]["results"]["arith_mc"]["acc,none"]
    herd_gen, hf_gen = _samples(root / "herd_on_hf", "arith_gen"), _samples(root / "hf_on_hf", "arith_gen")
    assert [s["resps"] for s in herd_gen] == [s["resps"] for s in hf_gen]
    assert herd.metrics["arith_gen"]["exact_match,strip"] == hf.metrics["arith_gen"]["exact_match,strip"]


def test_rolling_loglikelihood_matches_hf_across_windows(hf_runs) -> None:
    """A text longer than max_seq_len (128) is scored in several windows; herd and `hf` agree, and a short
    text's rolling score equals its log-likelihood after BOS."""
    from lm_eval.models.huggingface import HFLM

    root, _, _, herd_lm, _ = hf_runs
    # `hf` with add_bos_token=True encodes the text with BOS and puts BOS before it again, so it also scores
    # P(BOS | BOS); herd scores the text's own tokens after one BOS, which `hf` does with add_bos_token=False
    hf_lm = HFLM(pretrained=str(root / "hf_model"), add_bos_token=False, device="cpu", dtype="float32")
    long = " ".join(f"{q.prompt}{q.answer}." for q in successor_facts()[:20])
    short = "Question: what comes after 3? Answer: 4."
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([long, short])]
    assert len(herd_lm.tokenizer.encode(long)) > 2 * herd_lm.max_length
    ours, theirs = herd_lm.loglikelihood_rolling(reqs), hf_lm.loglikelihood_rolling(reqs)
    assert ours == pytest.approx(theirs, abs=1e-3)  # sums over ~300 tokens
    whole = herd_lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)])[0][0]
    assert ours[1] == pytest.approx(whole, abs=1e-5)


def test_robustness_and_contamination_commands_on_the_trained_model(workspace, capsys) -> None:
    """The 12 first arith_mc questions: robustness variants, and contamination against the training corpus
    (every question + answer is in it), whose clean/contaminated accuracy equals lm-eval's per-document acc."""
    root, model, tasks, _ = workspace
    mc = root / "mc12.jsonl"
    mc.write_text("".join((tasks / "arith_mc.jsonl").read_text().splitlines(keepends=True)[:12]))
    out = root / "robust"
    assert (
        main(
            [
                "eval",
                "robustness",
                "--model",
                str(model),
                "--data",
                str(mc),
                "--out",
                str(out),
                "--shots",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "robustness.json").read_text())
    # the trimmed vocabulary holds digits but not A-H, a-h or $&#@: only the number labels stay
    assert report["label_sets_dropped"] == ["letters", "symbols", "lowercase"]
    assert len(report["accuracy"]) == 8 and report["examples"] == 12 and report["chance"] == 0.25
    values = list(report["accuracy"].values())
    assert report["spread"]["all"]["range"] == pytest.approx(max(values) - min(values))
    assert all(0.0 <= v <= 1.0 for v in values) and (out / "robustness.png").is_file()

    out = root / "contam"
    argv = [
        "eval",
        "contamination",
        "--tasks",
        str(mc),
        "--corpus",
        str(root / "corpus.jsonl"),
        "--model",
        str(model),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    task = json.loads((out / "contamination.json").read_text())["tasks"]["mc12"]
    assert task["contaminated_fraction"] == 1.0 and min(task["overlap"]) == 1.0
    per_doc = [s["acc"] for s in _samples(root / "herd_eval", "arith_mc") if s["doc_id"] < 12]
    assert task["score_contaminated"] == pytest.approx(sum(per_doc) / 12) and task["score_clean"] is None


def test_two_data_parallel_ranks_give_the_single_process_results(workspace) -> None:
    from eval_workspace import evaluate_on_rank

    from herd.parallel.launch import spawn_ranks

    root, model, tasks, single = workspace
    out = root / "dp_eval"
    ranks = spawn_ranks(
        evaluate_on_rank,
        2,
        str(model),
        [str(tasks / "arith_mc.yaml"), str(tasks / "arith_gen.yaml")],
        str(out),
    )
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[1]["metrics"] == {} and ranks[0]["samples"] == {"arith_mc": 40, "arith_gen": 40}
    assert ranks[0]["metrics"]["arith_mc"]["acc,none"] == single["results"]["arith_mc"]["acc,none"]
    assert (
        ranks[0]["metrics"]["arith_gen"]["exact_match,strip"]
        == single["results"]["arith_gen"]["exact_match,strip"]
    )
    by_doc = {s["doc_id"]: s["resps"] for s in _samples(root / "herd_eval", "arith_mc")}
    dp = _samples(out, "arith_mc")
    assert sorted(s["doc_id"] for s in dp) == list(range(40))
    for s in dp:  # each rank batches other documents together: equal up to float rounding
        ours, single_run = [r[0] for r in s["resps"]], [r[0] for r in by_doc[s["doc_id"]]]
        assert [g for _, g in ours] == [g for _, g in single_run]
        assert [float(lp) for lp, _ in ours] == pytest.approx([float(lp) for lp, _ in single_run], abs=1e-5)
