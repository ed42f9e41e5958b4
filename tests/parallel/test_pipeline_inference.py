"""Pipeline-parallel generation (herd.parallel.pipeline_inference) equals one process token for token:
pp = 2 and 4 gloo ranks, 1, 2 and 4 micro-batches, greedy and seeded sampling, ragged prompts with stops."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from herd.parallel.launch import spawn_ranks
from herd.parallel.pipeline_inference import (
    PipelinedModel,
    build_inference_stage,
    generate_pipelined,
    serve_stage,
)
from herd.plans.llama import LLAMA_PLAN
from herd.text import SamplingParams, build_llama, generate, get_preset

pytestmark = pytest.mark.multiprocess

STOPS = frozenset(range(5, 128, 13))
PARAMS = [SamplingParams(6), SamplingParams(6, 0.8, 0.9, seed=3)]


def tiny_llama():
    args = get_preset("tiny", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=128,
                      max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    model = build_llama(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)  # sharper logits: no near-ties in greedy decoding
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in (5, 9, 3, 7, 6, 4, 8, 5)]


def _run(microbatch_counts: list[int]) -> dict:
    torch.set_num_threads(1)
    model = tiny_llama()
    stage = build_inference_stage(model, LLAMA_PLAN, dist.get_world_size(), dist.get_rank())
    layers = sorted(int(k) for k in stage.layers)
    if dist.get_rank() != 0:
        serve_stage(stage)
        return {"layers": layers}
    piped = PipelinedModel(stage)
    out = {"layers": layers, "cases": []}
    try:
        for params in PARAMS:
            # one process: the sampler draws per row from one stream, so sampled runs compare per micro-batch
            for m in microbatch_counts:
                got = generate_pipelined(piped, prompts(), m, generate, params=params, stop_ids=STOPS)
                n = len(prompts())
                bounds = [n * i // m for i in range(m + 1)]
                want = [
                    c
                    for a, b in zip(bounds, bounds[1:])
                    for c in generate(model, prompts()[a:b], params, STOPS)
                ]
                out["cases"].append((params.temperature, m, got == want, [c.tokens for c in got]))
    finally:
        piped.stop()
    return out


def _check(results: list[dict]) -> None:
    cases = results[0]["cases"]
    assert cases and all(ok for _, _, ok, _ in cases), [(t, m, ok) for t, m, ok, _ in cases]
    greedy = [tokens for t, _, _, tokens in cases if t == 0.0]
    assert all(g == greedy[0] for g in greedy)  # greedy: the micro-batch count changes no token
    assert sum(len(t) for t in greedy[0]) > len(prompts())


def test_pp2_generation_equals_one_process():
    results = spawn_ranks(_run, 2, [1, 2, 4], timeout_s=120)
    _check(results)
    assert [r["layers"] for r in results] == [[0, 1], [2, 3]]


def test_pp4_generation_equals_one_process():
    results = spawn_ranks(_run, 4, [1, 2, 4], timeout_s=120)
    _check(results)
    assert [r["layers"] for r in results] == [[0], [1], [2], [3]]


def _cli(model_dir: str) -> str:
    import contextlib
    import io

    from herd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", "--model", model_dir, "--prompt", "one two", "--prompt", "three four five six",
                     "--prompt", "seven", "--max-new-tokens", "5", "--pp", "2", "--microbatches", "2"]) == 0  # fmt: skip
    return out.getvalue()


def test_generate_cli_with_pp_prints_what_one_process_prints(tmp_path, capsys):
    from herd.cli import main
    from herd.text.loading import save_text_model
    from herd.text.tokenizer import Tokenizer
    from herd.text.vocab_subset import SubsetTokenizer

    tok = SubsetTokenizer.from_texts(Tokenizer(), ["one two three four five six seven eight nine ten"])
    args = get_preset("tiny", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    model = build_llama(args)
    save_text_model(model.state_dict(), args, tok, tmp_path / "m", "meta")
    printed = spawn_ranks(_cli, 2, str(tmp_path / "m"), timeout_s=120)
    assert printed[1] == ""  # only rank 0 prints
    main(["generate", "--model", str(tmp_path / "m"), "--prompt", "one two", "--prompt", "three four five six",
          "--prompt", "seven", "--max-new-tokens", "5"])  # fmt: skip
    single = capsys.readouterr().out
    assert printed[0] == single and len(single.splitlines()) == 3
