"""`herd serve`'s page (GET /) in a real headless browser: Debian's chromium driven by playwright's Python
API (`executable_path`; playwright's own browser download is not reachable here). The page uploads an
image, asks, and shows the streamed answer, which must be the server's own greedy answer token for token;
an oversized file, a file of the wrong kind and an unknown file type show their errors in the page.
Without a Chromium the browser tests skip and say why; the page's HTML/CSP checks run regardless."""

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from serve_workspace import data_url, png_bytes, wav_bytes, write_serve_workspace

from herd.serving.engine import ServedModel
from herd.serving.page import page_config, render_page
from herd.serving.server import ServeOptions, running

MAX_TOKENS = 12
UPLOAD_MB = 0.25  # small, so that a generated file can exceed it


def find_chromium() -> str | None:
    """HERD_CHROMIUM, else Debian's chromium (or another Chromium/Chrome) on PATH."""
    if os.environ.get("HERD_CHROMIUM"):
        return os.environ["HERD_CHROMIUM"]
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_serve_workspace(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def image_server(root):
    served = ServedModel.load(root / "image_model")
    with running(served, ServeOptions(port=0, max_tokens=MAX_TOKENS, max_upload_mb=UPLOAD_MB)) as url:
        yield served, url


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium found (apt-get install chromium, or set HERD_CHROMIUM): the browser test needs one"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_the_page_carries_the_servers_limits_and_a_strict_csp(image_server):
    served, url = image_server
    r = httpx.get(url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    config = json.loads(
        re.search(r'<script id="herd-config" type="application/json">(.*?)</script>', r.text).group(1)
    )
    assert config == {"model": served.name, "modalities": ["text", "image"], "max_upload_bytes": int(UPLOAD_MB * (1 << 20)),
                      "max_tokens": MAX_TOKENS, "needs_key": False}  # fmt: skip
    csp = r.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert (
        f'<script nonce="{nonce}">' in r.text and "default-src 'none'" in csp and "connect-src 'self'" in csp
    )
    assert "http://" not in r.text.replace(url, "") and "https://" not in r.text  # nothing from the internet
    assert httpx.get(url + "/", timeout=30).headers["content-security-policy"] != csp  # a nonce per response
    # a value cannot close the config's <script> element
    html, _ = render_page(page_config("</script><script>alert(1)</script>", ["audio"], 1, 1, True))
    blob = re.search(r'<script id="herd-config" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert json.loads(blob)["model"] == "</script><script>alert(1)</script>" and "<" not in blob


def test_ask_about_an_image_in_the_browser(image_server, browser, tmp_path):
    served, url = image_server
    png = png_bytes(3)
    (tmp_path / "shapes.png").write_bytes(png)
    question = "What color is the square?"
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
        {"type": "text", "text": question},
    ]
    want = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, "temperature": 0,
    }).json()["choices"][0]["message"]["content"]  # fmt: skip
    assert len(want) >= 3

    page = browser.new_page()
    try:
        page.goto(url + "/")
        assert served.name in page.inner_text("#model-info")
        page.set_input_files("#file", str(tmp_path / "shapes.png"))
        page.wait_for_selector("#preview-media")
        assert page.eval_on_selector("#preview-media", "el => el.tagName") == "IMG"
        # count the distinct texts the answer shows while it streams
        page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
            const a = document.getElementById('answer'); if (a) window.seen.push(a.textContent); })
            .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#question", question)
        page.click("#ask")
        page.wait_for_selector("#answer[data-finish]", timeout=60_000)
        assert (
            page.eval_on_selector("#answer", "e => e.textContent") == want
        )  # the streamed pieces add up exactly
        assert page.inner_text("#status").startswith("done (")
        assert page.inner_text("#error") == ""
        seen = [s for s in page.evaluate("window.seen") if s]
        assert seen[-1] == want and all(
            want.startswith(s) for s in seen
        )  # it only ever grew towards the answer
        shot = Path(os.environ.get("HERD_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # a follow-up question carries the conversation (the image in its first turn)
        page.fill("#question", "Say hi.")
        page.click("#ask")
        page.wait_for_function("() => document.querySelectorAll('.turn.assistant').length === 2 && "
                               "document.getElementById('answer').dataset.finish")  # fmt: skip
        assert page.inner_text("#error") == ""

        # an oversized file: the page refuses it before uploading, naming the limit
        big = tmp_path / "big.png"
        big.write_bytes(png_bytes(0, size=320))  # random pixels: ~300 KB, over the 0.25 MB cap
        assert big.stat().st_size > UPLOAD_MB * (1 << 20)
        page.set_input_files("#file", str(big))
        page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
        error = page.inner_text("#error")
        assert "big.png" in error and "0.25 MB upload limit" in error, error
        # audio to an image model, and a file that is no medium at all
        (tmp_path / "tone.wav").write_bytes(wav_bytes(0.2))
        page.set_input_files("#file", str(tmp_path / "tone.wav"))
        page.wait_for_function(
            "() => document.getElementById('error').textContent.includes('no audio encoder')"
        )
        (tmp_path / "notes.txt").write_text("hello")
        page.set_input_files("#file", str(tmp_path / "notes.txt"))
        page.wait_for_function(
            "() => document.getElementById('error').textContent.includes('not an image, video or audio')"
        )
    finally:
        page.close()


def test_server_errors_show_in_the_page(root, browser):
    """A refusal the page cannot foresee (a wrong API key: 401) is shown as the server's message."""
    served = ServedModel.load(root / "llm")
    with running(served, ServeOptions(port=0, max_tokens=4, api_key="sesame")) as url:
        page = browser.new_page()
        try:
            page.goto(url + "/")  # the page itself needs no key; the API does
            assert page.is_visible("#api-key")
            page.fill("#api-key", "wrong")
            page.fill("#question", "Say hi.")
            page.click("#ask")
            page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
            assert "missing or wrong API key" in page.inner_text("#error")
            assert (
                page.eval_on_selector_all(".turn", "els => els.length") == 0
            )  # the failed turn is taken back
            page.fill("#api-key", "sesame")
            page.click("#ask")
            page.wait_for_selector("#answer[data-finish]", timeout=60_000)
            assert page.inner_text("#error") == ""
        finally:
            page.close()


@pytest.mark.parametrize("kind", ["audio", "video"])
def test_ask_about_audio_and_video_in_the_browser(root, browser, tmp_path, kind):
    """The page's other two inputs: a WAV to a speech model (sent as `input_audio`), an mp4 to a video model
    (`video_url`); the streamed answer is the server's greedy answer to the same request."""
    import base64

    from serve_workspace import mp4_bytes, write_video_model

    if kind == "audio":
        model, name, data = root / "speech_model", "tone.wav", wav_bytes(0.6)
        part = {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"},
        }
    else:
        model, name, data = write_video_model(root), "clip.mp4", mp4_bytes(tmp_path)
        part = {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}}
    (tmp_path / name).write_bytes(data)
    question = "Repeat after me in English:"
    served = ServedModel.load(model)
    with running(served, ServeOptions(port=0, max_tokens=MAX_TOKENS)) as url:
        want = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
            "max_tokens": MAX_TOKENS, "temperature": 0,
        }).json()["choices"][0]["message"]["content"]  # fmt: skip
        page = browser.new_page()
        try:
            page.goto(url + "/")
            page.set_input_files("#file", str(tmp_path / name))
            page.wait_for_selector("#preview-media")
            assert page.eval_on_selector("#preview-media", "el => el.tagName") == kind.upper()
            page.fill("#question", question)
            page.click("#ask")
            page.wait_for_selector("#answer[data-finish]", timeout=60_000)
            assert page.inner_text("#error") == ""
            assert page.eval_on_selector("#answer", "e => e.textContent") == want and len(want) >= 3
        finally:
            page.close()
