"""SFT curation (Llama 3 §4.2.3): rules, judge parsing, greedy semantic selection against brute force, rejects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import write_jsonl

from herd.data.curation.sft_curation import curate_sft, load_curation_config
from herd.data.curation.sft_dedup import greedy_select, kmeans_clusters, normalise
from herd.data.curation.sft_judge import parse_difficulty, parse_intents, parse_rubric
from herd.data.curation.sft_rules import Rule, apply_rules, downsample_quota
from herd.data.curation.sft_scores import rank_percentiles
from herd.data.records import read_jsonl


def dialog(i: int, answer: str, **extra) -> dict:
    return {"id": f"d{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                         {"role": "assistant", "content": answer}], **extra}  # fmt: skip


class Ex:
    def __init__(self, ordinal: int, record: dict) -> None:
        self.ordinal, self.record = ordinal, record


# --- rules ---------------------------------------------------------------------------------------------
def test_downsample_quota_is_the_largest_k_under_the_ratio() -> None:
    for m in range(0, 30):
        for r in range(0, 60, 7):
            for ratio in (0.0, 0.05, 0.2, 0.5, 0.75):
                k = downsample_quota(m, r, ratio)
                best = max(j for j in range(m + 1) if j == 0 or j / (j + r) <= ratio + 1e-12)
                assert k == best, (m, r, ratio)


def test_rules_remove_and_downsample_deterministically() -> None:
    answers = []
    for i in range(100):
        if i % 4 == 0:
            answers.append(f"I'm sorry, but answer {i} is 7.")  # 25 apologies
        elif i % 10 == 1:
            answers.append(f"Great!!! Answer {i}!")  # 10 exclamation floods
        elif i % 10 == 3:
            answers.append(f"Answer {i} 😀🎉🔥")  # 10 emoji floods
        else:
            answers.append(f"Answer {i} is 7. Fine! 😀")  # one "!" and one emoji: under the limits
    examples = [Ex(i, dialog(i, a)) for i, a in enumerate(answers)]
    rules = [Rule("apology", "regex", r"\b(?:i'?m sorry|i apologi[sz]e)\b", action="downsample", target_ratio=0.1),
             Rule("emoji", "emoji", min_count=3), Rule("exclamation", "exclamation", min_count=3)]  # fmt: skip
    kept, removed, stats = apply_rules(examples, rules, seed=0)
    # apology: 25 match, 75 do not; ⌊0.1·75/0.9⌋ = 8 kept → 8/83 ≤ 0.1 (9/84 would not be)
    assert stats["apology"] == {"matched": 25, "removed": 17, "kept_matching": 8}
    assert stats["emoji"] == {"matched": 10, "removed": 10, "kept_matching": 0}
    assert stats["exclamation"] == {"matched": 10, "removed": 10, "kept_matching": 0}
    assert stats["removed"] == {"downsampled:apology": 17, "rule:emoji": 10, "rule:exclamation": 10}
    assert len(kept) == 63 and len(kept) + len(removed) == 100
    same = apply_rules(examples, rules, seed=0)[0]
    other = apply_rules(examples, rules, seed=1)[0]
    assert [e.ordinal for e in same] == [e.ordinal for e in kept]
    sorry = lambda ks: {e.ordinal for e in ks if "sorry" in e.record["messages"][1]["content"]}  # noqa: E731
    assert len(sorry(other)) == 8 and sorry(other) != sorry(kept)
    # the choice depends on (seed, rule, ordinal) only: shuffling the input keeps the same dialogs
    shuffled = apply_rules(examples[::-1], rules, seed=0)[0]
    assert sorted(e.ordinal for e in shuffled) == sorted(e.ordinal for e in kept)
    with pytest.raises(ValueError, match="action"):
        Rule("x", action="drop")
    with pytest.raises(ValueError, match="bad pattern"):
        Rule("x", pattern="(")


# --- judge parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [
        ("accuracy: 1\ninstruction_following: 0\ntone: 1", {"accuracy": 1, "instruction_following": 0, "tone": 1}),
        ("**Accuracy**: 1/1\n**Instruction-Following** - yes\n**Tone/Presentation**: fail",
         {"accuracy": 1, "instruction_following": 1, "tone": 0}),
        ('Sure! Here is my rating: {"Accuracy": true, "instruction following": "no", "tone": 1} Hope it helps.',
         {"accuracy": 1, "instruction_following": 0, "tone": 1}),
        ("1. Accuracy (score: 0) the sum is wrong\n2. Instruction following = 1\n3. Tone: PASS",
         {"accuracy": 0, "instruction_following": 1, "tone": 1}),
        ("accuracy: 1\ntone: 1", None),  # a criterion missing
        ("I cannot rate this.", None),
        ("", None),
    ],
)  # fmt: skip
def test_parse_general_rubric(text: str, want) -> None:
    assert parse_rubric(text, "general") == want


def test_parse_code_rubric_and_other_outputs() -> None:
    assert parse_rubric("Bug identification: 1\nUser intention: 0", "code") == {"bug_identification": 1,
                                                                               "user_intention": 0}  # fmt: skip
    assert parse_rubric("`bug_identification`: no\n`user_intent`: yes", "code") == {"bug_identification": 0,
                                                                                   "user_intention": 1}  # fmt: skip
    assert parse_rubric("accuracy: 1", "code") is None
    assert parse_intents("- write a poem\n- Write a poem\n* translate it to French\n2) explain the rhyme.") == [
        "write a poem", "translate it to French", "explain the rhyme"]  # fmt: skip
    assert parse_intents('The intents are ["sort a list", "explain complexity"].') == ["sort a list",
                                                                                      "explain complexity"]  # fmt: skip
    assert parse_intents("**Intents**: summarise; list risks, ask follow-up") == ["summarise", "list risks",
                                                                                  "ask follow-up"]  # fmt: skip
    assert parse_intents("no idea") is None
    assert parse_difficulty("Difficulty: 2") == 2
    assert parse_difficulty("I'd rate it **3**/3 — hard.") == 3
    assert parse_difficulty("This one is easy.") == 1
    assert parse_difficulty("rating = 1 (of 3)") == 1
    assert parse_difficulty("between 1 and 2, maybe 3") is None
    assert parse_difficulty("difficulty 5") is None
    assert (
        parse_difficulty(" **2** ") == 2
        and parse_difficulty("2 out of 3") == 2
        and parse_difficulty("1/3") == 1
    )
    assert parse_difficulty("3 plus 3 is 6.") is None  # a digit in an answer is not a rating


def test_rank_percentiles_and_top_quartile() -> None:
    pct, top = rank_percentiles([0.3, -1.0, 2.5, 0.3, 7.0, -2.0, 0.0])
    # order: 7.0, 2.5, 0.3 (index 0), 0.3 (index 3), 0.0, -1.0, -2.0; ⌈7/4⌉ = 2 in the top quartile
    assert pct == pytest.approx([5 / 7, 2 / 7, 6 / 7, 4 / 7, 1.0, 1 / 7, 3 / 7])
    assert top == [False, False, True, False, True, False, False]


# --- greedy selection ----------------------------------------------------------------------------------
def brute_force_select(vectors: np.ndarray, clusters, priority, threshold: float) -> list[bool]:
    """The paper's definition, spelt out with Python floats: walk each cluster by priority, keep when the
    maximum cosine to the kept ones is below the threshold."""
    n = len(vectors)
    unit = [[float(v) / math.sqrt(sum(float(w) ** 2 for w in row)) for v in row] for row in vectors]
    keep = [False] * n
    for c in sorted(set(int(c) for c in clusters)):
        members = sorted((i for i in range(n) if int(clusters[i]) == c), key=lambda i: (-priority[i], i))
        kept: list[int] = []
        for i in members:
            cos = [sum(a * b for a, b in zip(unit[i], unit[j])) for j in kept]
            if not cos or max(cos) < threshold:
                kept.append(i)
                keep[i] = True
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_greedy_selection_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(12, 16))
    # 12 originals, each with 0–3 noisy copies: many pairs near the threshold
    rows = [
        b + rng.normal(scale=rng.uniform(0.05, 0.6), size=16) for b in base for _ in range(rng.integers(1, 5))
    ]
    x = np.asarray(rows, dtype=np.float32)
    priority = [float(p) for p in rng.integers(0, 4, size=len(x))]  # ties on purpose
    clusters = kmeans_clusters(normalise(x), 4, seed=seed)
    for threshold in (0.5, 0.8, 0.95):
        keep, why = greedy_select(normalise(x), clusters, priority, threshold)
        assert keep.tolist() == brute_force_select(x, clusters, priority, threshold), (seed, threshold)
        assert 0 < len(why) < len(x) and len(why) == int((~keep).sum())  # the threshold bites, not all go
        unit = normalise(x)
        for i, (j, cos) in why.items():
            assert keep[j] and clusters[i] == clusters[j] and cos >= threshold
            assert cos == pytest.approx(float(unit[i] @ unit[j]), abs=1e-5)
    assert kmeans_clusters(normalise(x), 4, seed=seed).tolist() == clusters.tolist()  # seeded


# --- the pipeline without models: input checks, rules, rejects --------------------------------------------
def test_curate_sft_rejects_every_removed_record(tmp_path: Path) -> None:
    rows: list = [dialog(i, f"Answer {i}.") for i in range(20)]
    rows += [dialog(20 + i, f"I apologize, answer {i}.") for i in range(6)]
    rows += [
        dialog(30, "Wow!!! 🎉🎉🎉"),
        "{not json",
        {"messages": []},
        {"id": "u", "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},
    ]
    path = write_jsonl(tmp_path / "dialogs.jsonl", rows)
    cfg_path = tmp_path / "curate.toml"
    cfg_path.write_text('seed = 3\n[[rules]]\nname = "apology"\npattern = "i apologi[sz]e"\naction = "downsample"\n'
                        'target_ratio = 0.1\n[[rules]]\nname = "emoji"\nkind = "emoji"\nmin_count = 3\n')  # fmt: skip
    cfg = load_curation_config(cfg_path, progress=False)
    rep = curate_sft([path], tmp_path / "out", cfg)
    kept = read_jsonl(tmp_path / "out" / "curated.jsonl")
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    # 27 dialogs + 3 unusable records; apology: 6 match, 21 others → ⌊0.1·21/0.9⌋ = 2 kept
    assert rep["input_records"] == 30 and rep["output_records"] == 22 == len(kept)
    assert rep["bad_records"] == {"bad_json": 1, "bad_record": 1, "last_message_not_assistant": 1}
    assert rep["stages"]["rules"] == {"input": 27, "kept": 22, "removed": {"downsampled:apology": 4,
        "rule:emoji": 1}, "rules": {"apology": {"matched": 6, "removed": 4, "kept_matching": 2},
        "emoji": {"matched": 1, "removed": 1, "kept_matching": 0}}}  # fmt: skip
    assert rep["stages"]["semantic_dedup"]["counts"] == {"skipped": "no embedder"}
    # every input record is either kept or in rejects, once, with a reason
    ordinal_of = {r["id"]: i for i, r in enumerate(rows) if isinstance(r, dict) and "id" in r}
    assert sorted([ordinal_of[k["id"]] for k in kept] + [r["ordinal"] for r in rejects]) == list(range(30))
    assert len(rejects) == rep["rejects"] == 8 and all(r["reason"] and r["stage"] for r in rejects)
    assert [r["id"] for r in rejects if r["reason"] == "rule:emoji"] == ["d30"]
    assert len([r for r in rejects if r["reason"] == "downsampled:apology" and r["count"] == 1]) == 4
    assert all(k["curation"]["quality_score"] == 1.0 for k in kept)
    again = curate_sft([path], tmp_path / "again", cfg)
    assert (tmp_path / "again" / "curated.jsonl").read_text() == (
        tmp_path / "out" / "curated.jsonl"
    ).read_text()
    assert again["stages"] == rep["stages"]
    with pytest.raises(ValueError, match="unknown key"):
        load_curation_config(None, **{"dedup.treshold": 0.5})
    assert json.loads((tmp_path / "out" / "report.json").read_text())["output_records"] == 22


def test_curate_sft_command_and_example_config(tmp_path: Path, capsys) -> None:
    from herd.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "curate_sft.toml"
    cfg = load_curation_config(example)
    assert [r.name for r in cfg.rules] == ["emoji", "exclamation", "apology"] and cfg.dedup.threshold == 0.9
    rows = [dialog(i, "Sure!!! 🎉🎉🎉" if i == 2 else f"Answer {i}.") for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "curate-sft", "--input", str(path), "--out", str(tmp_path / "o"), "--config", str(example),
                 "--no-progress"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["output_records"] == 4 and summary["stages"]["rules"]["removed"] == {"rule:emoji": 1}
    bad = tmp_path / "bad.toml"
    bad.write_text("[dedup]\nthreshhold = 0.5\n")
    assert (
        main(["data", "curate-sft", "--input", str(path), "--out", str(tmp_path / "p"), "--config", str(bad)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "threshhold" in err and err.startswith("herd data curate-sft: error")


def test_generated_dialogs_and_the_default_rules(tmp_path: Path) -> None:
    from herd.data.curation.sft_curation import CurationConfig
    from herd.data.synthetic.sft_dialogs import defect_counts, generate_sft_dialogs, write_sft_dialogs

    rows = generate_sft_dialogs(400, seed=0)
    assert rows == generate_sft_dialogs(400, seed=0)
    assert defect_counts(rows) == {"apology": 53, "copy": 37, "emoji": 18, "exclamation": 15, "none": 169,
                                   "wrong": 108}  # fmt: skip
    by_id = {r["id"]: r for r in rows}
    assert all(r["messages"] == by_id[r["copy_of"]]["messages"] for r in rows if r["defect"] == "copy")
    path = write_sft_dialogs(tmp_path / "d.jsonl", 400, seed=0)
    rep = curate_sft([path], tmp_path / "out", CurationConfig(progress=False))  # the paper's default rules
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    # every emoji / exclamation dialog goes (copies of them too); apologies are cut to ≤ 5 % of the rest
    flooded = {r["id"] for r in rows if by_id.get(r.get("copy_of"), r)["defect"] in ("emoji", "exclamation")}
    assert {r["id"] for r in rejects if r["reason"] in ("rule:emoji", "rule:exclamation")} == flooded
    kept = read_jsonl(tmp_path / "out" / "curated.jsonl")
    sorry = sum(by_id.get(k.get("copy_of"), k)["defect"] == "apology" for k in kept)
    stats = rep["stages"]["rules"]["rules"]["apology"]
    assert (
        sorry == stats["kept_matching"] and sorry / len(kept) <= 0.05 and (sorry + 1) / (len(kept) + 1) > 0.05
    )
