"""Model, encoder and adapter code stays single-device: no torch.distributed, no training core."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("text", "vision", "speech", "adapters")
FORBIDDEN = ("torch.distributed", "fairscale", "herd.trainer", "herd.parallel", "herd.tasks")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def model_files() -> list[Path]:
    return [p for pkg in MODEL_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_model_packages_exist():
    assert len(model_files()) >= 5


@pytest.mark.parametrize("path", model_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_distributed_imports_in_model_code(path):
    bad = [m for m in imported_modules(path) if m.startswith(FORBIDDEN) or m == "torch.distributed"]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_rule_detects_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import torch.distributed as dist\nfrom torch.distributed.tensor import DTensor\n")
    assert [m for m in imported_modules(f) if m.startswith(FORBIDDEN)] == [
        "torch.distributed",
        "torch.distributed.tensor",
        "torch.distributed.tensor.DTensor",
    ]
