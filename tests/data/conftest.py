"""Fixtures of the data-preparation tests; the helpers they use live in synthetic_inputs.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import draw_image, variants, write_jsonl


@pytest.fixture
def planted_image_set(tmp_path: Path):
    """6 originals × 4 near-duplicates + 10 distinct images, a manifest and the planted grouping."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows, group_of = [], []
    for g in range(6):
        base = draw_image(1000 + g)
        for v, im in enumerate([base, *variants(base)]):
            name = f"g{g}_v{v}.png"
            im.save(img_dir / name)
            rows.append({"id": f"g{g}_v{v}", "image": f"imgs/{name}", "caption": f"group {g}"})
            group_of.append(g)
    for s in range(10):
        name = f"solo{s}.png"
        draw_image(2000 + s).save(img_dir / name)
        rows.append({"id": f"solo{s}", "image": f"imgs/{name}", "caption": "solo"})
        group_of.append(100 + s)
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    return manifest, rows, np.array(group_of)
