"""Where the repository's shipped files are (configs/), for commands run from a clone or an editable install."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def config_path(name: str) -> Path:
    """A shipped config by name (`quickstart.toml`, `text/llama3_8b.toml`); a clear error if absent."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped config {name!r} not found under {CONFIG_DIR}; herd's configs ship with the repository "
            "(install herd from a clone with `pip install -e .`) or pass --config PATH"
        )
    return path
