"""Contact sheets: images in a grid with a caption under each (the quickstart's "what the model answered").

The layout is fixed arithmetic, not measured text, so a sheet's size is known in advance and sheets of
different runs line up:
  width  = cols · thumb + (cols + 1) · pad
  height = rows · (thumb + lines · line_height + pad) + pad,   line_height = font_size + 4
Fewer images than `cols` give a narrower sheet (one row of n). Each image is scaled to fit a `thumb × thumb` cell (aspect kept, centred; small images are enlarged
with nearest-neighbour so a 64-px synthetic image stays crisp). Captions are word-wrapped to the cell
width and cut to `lines` lines with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from herd.data.records import atomic_write

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken by characters."""
    out: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        while len(word) > 1 and font.getlength(word) > width:  # a URL or an id: cut it
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            out.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        out.append(current)
    if len(out) > lines:
        last = out[lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        out = out[: lines - 1] + [last + "…"]
    return out


def _fit(image: Image.Image, thumb: int) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    scale = thumb / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    return image.resize(size, resample)


def grid_size(
    n: int, cols: int = 4, thumb: int = 160, pad: int = 8, lines: int = 3, font_size: int = 12
) -> tuple[int, int]:
    """(width, height) of the sheet `save_image_grid` draws for n images."""
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    cell_h = thumb + lines * (font_size + 4) + pad
    return cols * thumb + (cols + 1) * pad, rows * cell_h + pad


def make_image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    cols: int = 4,
    thumb: int = 160,
    pad: int = 8,
    lines: int = 3,
    font_size: int = 12,
) -> Image.Image:
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to draw")
    width, height = grid_size(len(images), cols, thumb, pad, lines, font_size)
    cols = max(1, min(cols, len(images)))
    line_h = font_size + 4
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(font_size)
    for i, (image, caption) in enumerate(zip(images, captions)):
        row, col = divmod(i, cols)
        x = pad + col * (thumb + pad)
        y = pad + row * (thumb + lines * line_h + pad)
        small = _fit(image, thumb)
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        for j, line in enumerate(_wrap(caption, font, thumb, lines)):
            draw.text((x, y + thumb + 2 + j * line_h), line, fill=TEXT, font=font)
    return sheet


def save_image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    path: str | Path,
    cols: int = 4,
    thumb: int = 160,
    pad: int = 8,
    lines: int = 3,
    font_size: int = 12,
) -> Path:
    """Draw the sheet and write it as PNG (atomically: a viewer never sees half a file). Returns path."""
    sheet = make_image_grid(images, captions, cols, thumb, pad, lines, font_size)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path
