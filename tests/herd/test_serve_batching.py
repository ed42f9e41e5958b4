"""Continuous batching: requests that join and leave one running batch at different steps get exactly
the greedy tokens each gets alone from `generate`, rows really share steps, and a full queue is a 503."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_workspace import write_serve_workspace

from herd.serving.batcher import Batcher, Event, Job, QueueFull
from herd.serving.engine import Part, ServedModel, Turn
from herd.serving.server import ServeOptions, running
from herd.text.generation import SamplingParams, generate

QUESTIONS = ["Say hi.", "Count: one two three", "What color is the square?", "Hello!", "How many shapes are there?",
             "Is the red circle left or right of the blue square?", "one two", "Repeat after me in English: the cat"]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return ServedModel.load(write_serve_workspace(tmp_path_factory.mktemp("batching")) / "llm")


def alone(served, prompt, n):
    return generate(
        served.model, [prompt], SamplingParams(n, 0.0), served.stop_ids, vocab_limit=served.vocab_limit
    )[0].tokens


def test_rows_joining_and_leaving_match_generate_alone(served):
    """8 jobs of different prompt lengths and token budgets, submitted while others run, on 4 slots."""
    batcher = Batcher(served.llm, served.stop_ids, max_batch=4, max_queue=16, vocab_limit=served.vocab_limit)
    got: dict[int, list[int]] = {}
    done = {i: threading.Event() for i in range(len(QUESTIONS))}
    jobs = []
    for i, q in enumerate(QUESTIONS):
        prompt = served.job([Turn("user", [Part("text", "q", text=q)])], SamplingParams(0)).prompt

        def emit(ev: Event, i=i) -> None:
            if ev.token is not None:
                got.setdefault(i, []).append(ev.token)
            else:
                assert ev.error is None, ev.error
                done[i].set()

        jobs.append(Job(prompt, SamplingParams(6 + 3 * (i % 4), 0.0), emit))
    batcher.submit(jobs[0])  # before the worker starts: queued
    batcher.start()
    try:
        for job in jobs[1:]:
            batcher.submit(job)
        assert all(d.wait(60) for d in done.values())
    finally:
        batcher.close()
    for i, job in enumerate(jobs):
        want = alone(served, job.prompt, job.params.max_new_tokens)
        assert got.get(i, []) == want, (QUESTIONS[i], got.get(i), want)
    assert batcher.max_rows_seen >= 2  # rows did share steps
    total = sum(len(v) for v in got.values())
    assert batcher.steps < total  # fewer forward passes than tokens: that is the batching


def test_concurrent_http_requests_match_alone_and_full_queue_is_503(served):
    def ask(client, q):
        body = {
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 10,
            "temperature": 0,
            "return_token_ids": True,
        }
        return client.post("/v1/chat/completions", json=body)

    for max_queue in (64, 1):  # room for all: every request answered; a queue of one: the rest 503
        options = ServeOptions(port=0, max_batch=4, max_queue=max_queue, max_tokens=10)
        with running(served, options) as url, httpx.Client(base_url=url, timeout=60) as client:
            with ThreadPoolExecutor(16) as pool:
                replies = list(pool.map(lambda q, c=client: ask(c, q), QUESTIONS * 2))
            ok = [(q, r) for q, r in zip(QUESTIONS * 2, replies) if r.status_code == 200]
            busy = [r for r in replies if r.status_code != 200]
            assert all(r.status_code == 503 and "queue is full" in r.json()["error"]["message"] for r in busy)
            assert len(ok) == 16 if max_queue == 64 else len(ok) >= 1
            for q, r in ok:
                prompt = r.json()["prompt_token_ids"]
                assert r.json()["choices"][0]["token_ids"] == alone(served, prompt, 10), q
            assert ask(client, "Say hi.").status_code == 200  # the queue drained


def test_submit_refuses_when_full_and_too_long(served):
    batcher = Batcher(served.llm, served.stop_ids, max_batch=2, max_queue=1)  # not started: nothing drains
    job = Job([1, 2, 3], SamplingParams(4), lambda e: None)
    batcher.submit(job)
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit(job)
    with pytest.raises(ValueError, match="exceeds the server's context 256"):
        batcher.submit(Job([1] * 250, SamplingParams(10), lambda e: None))
