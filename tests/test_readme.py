"""The README's first lines are the two commands; `.ci/run` runs exactly the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 20, "the README must open with the commands block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("python3 -m venv") and "herd quickstart" in cmds[0]
    assert "pytest" in cmds[1] and "ruff check" in cmds[1] and "ruff format --check" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert readme_commands()[1] in ci_lines
