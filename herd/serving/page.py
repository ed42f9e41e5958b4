"""`GET /`: the one static page of `herd serve` (herd/serving/static/index.html).

The page is plain HTML + JavaScript with no build step and nothing fetched from the internet. What it
needs to know about this server (the model's name, the inputs it takes, the upload cap, whether an API
key is required) is written into it as JSON when it is served, so it never guesses a limit the server
then enforces differently. Its inline script and style carry a per-response nonce that the
Content-Security-Policy allows, and nothing else: no other script, no other origin.
"""

from __future__ import annotations

import json
import secrets
from functools import cache
from importlib import resources
from typing import Any

PAGE_FILE = "index.html"


@cache
def page_template() -> str:
    return resources.files("herd.serving").joinpath("static", PAGE_FILE).read_text(encoding="utf-8")


def page_config(
    name: str, modalities: list[str], max_upload_bytes: int, max_tokens: int, needs_key: bool
) -> dict:
    return {
        "model": name,
        "modalities": ["text", *sorted(set(modalities) - {"text"})],
        "max_upload_bytes": max_upload_bytes,
        "max_tokens": max_tokens,
        "needs_key": needs_key,
    }


def render_page(config: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(HTML, headers) for one response; `config` from `page_config`."""
    nonce = secrets.token_urlsafe(16)
    # JSON inside <script>: "<" escaped so that no value can close the element
    blob = json.dumps(config).replace("<", "\\u003c")
    html = page_template().replace("__HERD_CONFIG__", blob).replace("__HERD_NONCE__", nonce)
    headers = {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "img-src blob:; media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return html, headers


__all__ = ["page_config", "page_template", "render_page"]
