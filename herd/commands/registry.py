"""The parser pieces every command family registers with (one-line errors, leaf commands, groups)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn


class HerdParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, like every other `herd` error.

    argparse prints the whole usage first (a dozen lines for `herd data dedup-images`), which buries
    the message; `--help` still shows it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(
    subparsers: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None = None,
    takes_overrides: bool = False,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Register one leaf command whose `func(args) -> exit status` runs it.

    `takes_overrides`: extra `--section.key=value` arguments are collected into `args.overrides` (job
    config overrides, `herd.config.load_config`) instead of being rejected.
    """
    p = subparsers.add_parser(name, help=help, description=description or help, **kwargs)
    p.set_defaults(func=func, takes_overrides=takes_overrides, overrides=[], command_parser=p)
    return p


def add_group(subparsers: Any, name: str, help: str) -> Any:
    """A command family (`herd data ...`); returns its subparsers for `add_command`."""
    group = subparsers.add_parser(name, help=help, description=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


__all__ = ["HerdParser", "add_command", "add_group"]
