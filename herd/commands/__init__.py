"""Every `herd` subcommand, registered in one place; `herd.cli.main` runs them.

    herd quickstart                        train a tiny text model and a vision adapter on CPU, end to end
    herd train TASK --config PATH          the one training loop; TASK from herd.task.TASKS
    herd generate | chat | guard | ask | serve   inference; guard: the Llama Guard 3 filter; serve: the OpenAI-compatible server
    herd post sample|gatt|average|dpo-reference      post-training data and checkpoints
    herd data tokenize|dedup-images|dedup-text|filter-text|filter-clip|resample|curate-sft   data preparation
    herd convert | plan                    checkpoint layouts; memory/throughput of parallel layouts
    herd eval lm|robustness|contamination|vqa|video-qa|asr|reward   benchmarks and the paper's analyses
    herd quantize fp8 SRC DST              a row-wise FP8 copy of a text checkpoint (paper §6.2)

The scheme: a verb for a job that stands alone (`train`, `generate`, `convert`, ...), a group noun for a
family of preparation steps (`post`, `data`) whose members are `verb` or `verb-object`. One module per
family (`train`, `inference`, `post`, `data`, `models`) holds its parsers and one `cmd_*` per command;
a `cmd_*` takes the parsed namespace, calls ONE library function with keyword arguments and prints its
result. Library modules hold no argparse. The library imports happen inside the `cmd_*` functions, so
building the parser stays cheap.
"""

from __future__ import annotations

import argparse

from herd import __version__
from herd.commands.registry import HerdParser, add_command, add_group

EPILOG = """commands by family:
  train        quickstart, train TASK
  inference    generate, chat, guard, ask, serve
  post         post sample | gatt | average | dpo-reference
  data         data tokenize | dedup-images | dedup-text | filter-text | filter-clip | resample | curate-sft
  models       convert, plan
  evaluate     eval lm | robustness | contamination | vqa | video-qa | asr | reward
  quantize     quantize fp8

Bad input ends with one line on stderr, `herd COMMAND: error: ...`, and exit status 2;
HERD_DEBUG=1 shows the traceback instead."""


def build_parser() -> argparse.ArgumentParser:
    """The `herd` parser with every command; each leaf sets `func`, `command_parser`, `overrides`."""
    from herd.commands import data, evaluate, inference, models, post, quantize, train

    parser = HerdParser(
        prog="herd",
        description="The Llama 3 herd of models, rebuilt for researchers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in (train, inference, post, data, models, evaluate, quantize):
        family.register(sub)
    return parser


def command_names(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Every leaf command as typed after `herd`, e.g. "data tokenize" (for docs and tests)."""
    parser = parser or build_parser()
    found: list[str] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        actions = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            found.append(prefix.strip())
            return
        for name, child in actions[0].choices.items():
            walk(child, f"{prefix} {name}")

    walk(parser, "")
    return found


__all__ = ["EPILOG", "HerdParser", "add_command", "add_group", "build_parser", "command_names"]
