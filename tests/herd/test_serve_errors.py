"""Bad input never hurts `herd serve`: the API key, the upload cap, refused URL schemes, the max_tokens
cap, and a fuzz of 100+ bad requests (random bytes, truncated base64, PNG headers with absurd sizes,
nested JSON, wrong types and content types, huge headers) each answered 4xx without a traceback, after
which the server still answers a good request."""

import base64
import json
import random
import socket
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from serve_workspace import data_url, png_bytes, wav_bytes, write_serve_workspace

from herd.serving.engine import ServedModel
from herd.serving.server import ServeOptions, running

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_serve_workspace(tmp_path_factory.mktemp("serve_errors"))


@pytest.fixture(scope="module")
def image_server(root):
    served = ServedModel.load(root / "image_model")
    options = ServeOptions(port=0, api_key=KEY, max_upload_mb=1, max_tokens=8)
    with running(served, options) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield served, url, client


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **extra}


def image_part(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What color?"}]


def png_with_size(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (valid CRC) announcing width×height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_api_key_upload_cap_and_refused_urls(image_server):
    _, url, client = image_server
    good = chat("Say hi.")
    assert httpx.post(f"{url}/v1/chat/completions", json=good).status_code == 401
    bad_key = httpx.post(f"{url}/v1/chat/completions", json=good, headers={"Authorization": "Bearer nope"})
    assert bad_key.status_code == 401 and "API key" in bad_key.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    r = client.post("/v1/chat/completions", json=good)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    big = chat(image_part(data_url(b"\0" * (1 << 20), "image/png")))
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "1 MB" in r.json()["error"]["message"]
    for ref in ("http://example.com/a.png", "https://example.com/a.png", "file:///etc/passwd", "/etc/passwd"):
        r = client.post("/v1/chat/completions", json=chat(image_part(ref)))
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "only data: URLs" in msg and "messages[0].content[0].image_url" in msg
    r = client.post("/v1/chat/completions", json={**chat("Say hi."), "max_tokens": 10**6})  # capped to 8
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


def bad_requests(rng: random.Random) -> list[tuple[str, dict, bytes]]:
    """(what, headers, body) of requests that must each get a 4xx."""
    j = {"Content-Type": "application/json"}
    out: list[tuple[str, dict, bytes]] = []
    for i in range(30):
        out.append((f"random bytes {i}", j, rng.randbytes(rng.randint(0, 2000))))
    png = base64.b64encode(png_bytes(1)).decode()
    for i in range(12):
        cut = png[: rng.randint(1, len(png) - 2)]
        if len(cut) % 4 == 0:  # keep it invalid base64 or a truncated image
            cut = cut[:-1]
        out.append(
            (
                f"truncated base64 {i}",
                j,
                json.dumps(chat(image_part(f"data:image/png;base64,{cut}"))).encode(),
            )
        )
    for w, h in ((100_000, 100_000), (2**31 - 1, 2**31 - 1), (1, 2**31 - 1), (70_000, 70_000), (0, 0)):
        url = data_url(png_with_size(w, h), "image/png")
        out.append((f"png header {w}x{h}", j, json.dumps(chat(image_part(url))).encode()))
    for depth in (1000, 10_000, 100_000):
        out.append((f"nested arrays {depth}", j, b"[" * depth + b"]" * depth))
        out.append((f"nested objects {depth}", j, b'{"a":' * depth + b"1" + b"}" * depth))
        out.append(
            (
                f"nested content {depth}",
                j,
                json.dumps(chat("x")).replace('"x"', "[" * depth + "]" * depth).encode(),
            )
        )
    good = json.dumps(chat("Say hi.")).encode()
    for ctype in (
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "",
        "image/png",
        "application/xml",
    ):
        out.append((f"content type {ctype!r}", {"Content-Type": ctype} if ctype else {}, good))
    wrong = [
        {"messages": "hi"}, {"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 123}]}, chat("x", max_tokens="abc"), chat("x", max_tokens=0),
        chat("x", max_tokens=-5), chat("x", temperature=-1), chat("x", temperature="hot"), chat("x", top_p=0),
        chat("x", n=3), chat("x", stream="yes please"), chat("x", stop=5), chat("x", seed="s"),
        {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
        chat("x", model="gpt-4"), [1, 2, 3], "just a string", None, 42,
        chat(image_part("data:text/html;base64,PGgxPg==")), chat(image_part("data:image/png,notbase64")),
        chat(image_part("data:image/png;base64,")), chat(image_part("data:image/png;base64,AAAA")),
        chat(image_part("javascript:alert(1)")), chat(image_part("ftp://x/y.png")),
        chat([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]),
        chat([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "ogg"}}]),
        chat([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAAAAA"}}]),
        chat(image_part(data_url(png_bytes(1), "image/png")) * 2),
        {"messages": [{"role": "assistant", "content": image_part(data_url(png_bytes(1), "image/png"))}]},
        chat("word " * 400),  # longer than the model's 256-token context
    ]  # fmt: skip
    for i, body in enumerate(wrong):
        out.append((f"wrong value {i}: {json.dumps(body)[:60]}", j, json.dumps(body).encode()))
    for i in range(10):  # random mutations of a good image request
        body = bytearray(json.dumps(chat(image_part(data_url(png_bytes(2), "image/png")))).encode())
        for _ in range(rng.randint(1, 5)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        out.append((f"mutated {i}", j, bytes(body)))
    return out


def test_fuzz_bad_requests_are_4xx_and_the_server_survives(image_server, capsys):
    _, url, client = image_server
    before = rss_mb()
    cases = bad_requests(random.Random(0))
    statuses = {}
    for what, headers, body in cases:
        r = client.post("/v1/chat/completions", content=body, headers={**AUTH, **headers})
        if r.status_code == 200:  # a random mutation may still be a valid request (e.g. it hit the text)
            assert what.startswith("mutated"), what
            continue
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
        assert "Traceback" not in r.text and 'File "' not in r.text, (what, r.text[:300])
        assert r.json()["error"]["message"], what
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    host, port = url.removeprefix("http://").split(":")
    for size in (70_000, 200_000, 1_000_000):  # huge headers: refused by the HTTP layer, never a crash
        with socket.create_connection((host, int(port)), timeout=30) as s:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * size}\r\n\r\n".encode()
            try:
                s.sendall(head)
                reply = s.recv(200)
            except (BrokenPipeError, ConnectionResetError):
                reply = b"HTTP/1.1 400 (connection closed)"
            status = int(reply.split()[1]) if reply else 400  # a closed connection counts as refused
            assert 400 <= status < 500, reply
            statuses[status] = statuses.get(status, 0) + 1
    for path, method in (("/v1/nothing", "GET"), ("/v1/chat/completions", "GET"), ("/v1/models", "DELETE")):
        r = client.request(method, path)
        assert 400 <= r.status_code < 500 and "error" in r.json()
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    total = sum(statuses.values())
    assert total >= 100, statuses
    good = client.post("/v1/chat/completions", json=chat(image_part(data_url(png_bytes(5), "image/png"))))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"
    after = rss_mb()
    with capsys.disabled():
        print(
            f"\nfuzz: {total} bad requests, statuses {dict(sorted(statuses.items()))}; RSS {before:.0f} → {after:.0f} MB"
        )
    assert after - before < 300


def test_bad_audio_names_the_part(root):
    served = ServedModel.load(root / "speech_model")
    with running(served, ServeOptions(port=0)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wav = base64.b64encode(wav_bytes(0.3)).decode()
        for data, fmt, says in ((wav[:-9], "wav", "base64"), (base64.b64encode(b"RIFF" + b"\0" * 64).decode(), "wav", ""),
                                (base64.b64encode(png_bytes()).decode(), "mp3", "")):  # fmt: skip
            content = [
                {"type": "text", "text": "hi"},
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
            ]
            r = client.post("/v1/chat/completions", json=chat(content))
            msg = r.json()["error"]["message"]
            assert r.status_code == 400 and "messages[0].content[1].input_audio" in msg and says in msg, msg
        content = [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]
        assert client.post("/v1/chat/completions", json=chat(content)).status_code == 200


def test_a_guard_screens_requests_with_text_and_image_parts(root):
    """`--guard`: herd.guard's Guard on the server. An untrained checkpoint as the guard writes noise, which
    the guard reads as unsafe (it fails closed): every request is refused with 400 `content_filter`,
    whether its content is a string or a list of image and text parts, and nothing reaches a traceback."""
    from herd.guard import Guard

    served = ServedModel.load(root / "image_model")
    verdict = Guard.load(root / "llm").check_user([{"role": "user", "content": "Say hi."}])
    assert not verdict.safe and verdict.categories == []
    options = ServeOptions(port=0, max_tokens=4, guard=str(root / "llm"))
    with running(served, options) as url, httpx.Client(base_url=url, timeout=60) as client:
        for content in ("Say hi.", image_part(data_url(png_bytes(), "image/png"))):
            r = client.post("/v1/chat/completions", json=chat(content))
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["error"]["type"] == "content_filter" and "Traceback" not in r.text


class LengthGuard:
    """A rule standing in for the guard model, so that the server's screening of streamed replies can be
    checked exactly (tests/herd/test_guard.py serves a trained Llama Guard end to end): a reply of
    `limit` characters or more is unsafe (S9); every text the server screens is recorded."""

    def __init__(self, limit: int) -> None:
        self.limit, self.screened = limit, []

    def check_user(self, messages):
        from herd.guard import GuardVerdict

        return GuardVerdict(True)

    def check_response(self, messages, reply):
        from herd.guard import GuardVerdict

        self.screened.append(reply)
        return GuardVerdict(True) if len(reply) < self.limit else GuardVerdict(False, ["S9"])


def test_streamed_replies_are_released_only_once_the_guard_cleared_them(root):
    import openai

    from herd.guard import GuardVerdict, refusal

    served = ServedModel.load(root / "llm")
    question = [{"role": "user", "content": "Count: one two three"}]
    with running(served, ServeOptions(port=0, max_tokens=12)) as url:
        full = httpx.post(f"{url}/v1/chat/completions", json={"messages": question, "max_tokens": 12,
                          "temperature": 0}, timeout=60).json()["choices"][0]["message"]["content"]  # fmt: skip
    assert len(full) >= 12, full

    def stream(guard):
        with running(served, ServeOptions(port=0, max_tokens=12, guard_every_chars=3), guard) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
            chunks = list(client.chat.completions.create(model=served.name, messages=question, max_tokens=12,
                                                         temperature=0, stream=True))  # fmt: skip
            whole = client.chat.completions.create(
                model=served.name, messages=question, max_tokens=12, temperature=0
            )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].choices[0], whole.choices[0]

    # a guard that clears everything: the same reply, screened as it grew and once whole at the end
    guard = LengthGuard(10_000)
    text, last, whole = stream(guard)
    assert text == full and last.finish_reason in ("stop", "length") and whole.message.content == full
    streamed_checks = guard.screened[:-1]  # the last one screened the non-streamed reply
    assert streamed_checks[-1] == full and all(full.startswith(s) for s in streamed_checks)
    assert len(streamed_checks) >= 3  # screened in pieces of >= 3 characters, not only at the end

    # a guard that flags the reply half way: only cleared text reached the client, then the refusal
    limit = len(full) // 2
    guard = LengthGuard(limit)
    text, last, whole = stream(guard)
    assert full.startswith(text) and len(text) < limit, (text, full)
    flagged = next(s for s in guard.screened if len(s) >= limit)
    assert flagged.startswith(text) and len(flagged) - len(text) >= 3  # the held piece that failed
    assert last.finish_reason == "content_filter"
    assert (
        last.delta.refusal
        == refusal(GuardVerdict(False, ["S9"]))
        == ("I can't help with that: the safety filter flagged it as S9 Indiscriminate Weapons.")
    )
    assert last.model_extra["guard"] == {
        "flagged": "assistant",
        "categories": ["S9"],
        "titles": ["Indiscriminate Weapons"],
    }
    # not streamed: OpenAI's refusal shape
    assert whole.message.content is None and whole.message.refusal == last.delta.refusal
    assert whole.finish_reason == "content_filter" and whole.model_extra["guard"]["categories"] == ["S9"]
