"""Media a client sends inside a chat request: `data:` URLs and base64 audio, decoded defensively.

The server never fetches a URL nor opens a path a client names: `http(s)://`, `file://` and every other
scheme are refused before anything is read. Every failure is a `RequestError` whose message names the
part (`messages[0].content[1].image_url`) and the problem, and never carries a traceback.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image

# An image over this many pixels is refused from its header alone, before any pixel is decoded (PIL's
# own bomb check fires only at 2× its limit; 40 MP covers any photo a vision model tiles).
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
VIDEO_TYPES = ("video/mp4", "video/webm", "video/x-matroska", "video/quicktime", "video/avi")
AUDIO_FORMATS = ("wav", "mp3")


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and a message safe to show the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def b64decode(data: str, where: str) -> bytes:
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: not valid base64 ({e})") from None
    if not out:
        raise RequestError(400, f"{where}: empty payload")
    return out


def data_url(url: str, where: str, allowed: tuple[str, ...]) -> bytes:
    """The bytes of a `data:<type>;base64,<payload>` URL whose media type is in `allowed`."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "a bare path"
        raise RequestError(
            400,
            f"{where}: only data: URLs are accepted (got {scheme}); the server never fetches URLs or reads paths",
        )
    if not payload:
        raise RequestError(400, f"{where}: the data: URL has no payload after ','")
    meta = head[len("data:") :].split(";")
    media_type, params = meta[0].strip().lower(), [m.strip().lower() for m in meta[1:]]
    if "base64" not in params:
        raise RequestError(400, f"{where}: the data: URL must be base64-encoded (data:<type>;base64,...)")
    if media_type not in allowed:
        raise RequestError(400, f"{where}: media type {media_type[:40]!r} is not one of {', '.join(allowed)}")
    return b64decode(payload, where)


def decode_image(data: bytes, where: str) -> Image.Image:
    """RGB image; a header announcing more than MAX_IMAGE_PIXELS is refused before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise RequestError(
                        400, f"{where}: image of {w}×{h} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit"
                    )
                return im.convert("RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(400, f"{where}: image too large to decode safely ({e})") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, bad chunks: all OSError/ValueError/...
        raise RequestError(
            400, f"{where}: not a decodable image ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def decode_audio(data: bytes, fmt: str, where: str, max_seconds: float) -> Any:
    """16 kHz mono waveform (N,) of a wav / mp3 file's bytes."""
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"{where}: format {str(fmt)[:20]!r} is not one of {', '.join(AUDIO_FORMATS)}")
    from herd.speech.audio import AudioError, read_audio_bytes

    try:
        return read_audio_bytes(data, f"upload.{fmt}", max_seconds=max_seconds)
    except AudioError as e:
        raise RequestError(400, f"{where}: {e}") from None
    except Exception as e:
        raise RequestError(400, f"{where}: not decodable {fmt} audio ({type(e).__name__})") from None


def decode_video(data: bytes, num_frames: int, where: str) -> Any:
    """`num_frames` frames sampled uniformly over a video file's bytes (`herd.vision.video.read_frames`)."""
    from herd.vision.video import VideoReadError, read_frames

    try:
        return read_frames(data, num_frames, name="upload")
    except VideoReadError as e:
        raise RequestError(400, f"{where}: {e}") from None
    except Exception as e:
        raise RequestError(400, f"{where}: not a decodable video ({type(e).__name__})") from None


__all__ = ["RequestError", "b64decode", "data_url", "decode_audio", "decode_image", "decode_video"]
