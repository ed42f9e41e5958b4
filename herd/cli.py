"""The `herd` console script (also `python -m herd`): parse, run one command, turn bad input into one line.

The commands live in `herd.commands` (one module per family; `herd --help` lists them). Each mirrors a
Python function, so scripts can call `herd.quickstart.run_quickstart(...)`,
`herd.text.generation.generate_text(...)` etc. directly.

Exit status: 0 done; 1 a result to act on (`herd plan`: no layout fits); 2 bad input — a missing or
unreadable file, a broken config value, a checkpoint that does not match its config, an image PIL
refuses — reported as ONE line on stderr, `herd <command>: error: <message naming the file>`, never a
traceback. A command line that cannot work (an unknown option, options that contradict each other)
exits through `SystemExit(2)` after the same one line, as argparse does. `HERD_DEBUG=1` re-raises
instead, so a real bug keeps its traceback; anything that is not bad input (a TypeError, a CUDA error)
always does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from herd.commands import build_parser
from herd.commands.common import UsageError, debug_enabled, is_bad_input, one_line_error


def main(argv: Sequence[str] | None = None) -> int:
    """Run `herd ARGV`; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = args.command_parser
    if extra and not args.takes_overrides:
        command.error(f"unrecognized arguments: {' '.join(extra)}")  # SystemExit(2), as argparse does
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(one_line_error(command.prog, e), file=sys.stderr)
        raise
    except Exception as e:
        if debug_enabled() or not is_bad_input(e):
            raise
        print(one_line_error(command.prog, e), file=sys.stderr)
        return 2


__all__ = ["main"]
