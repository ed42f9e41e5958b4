"""What every `herd` command shares: the usage error, bad-input errors turned into one line, small helpers.

A command either succeeds (exit status 0), reports a result the user must act on (1, e.g. `herd plan`
when no layout fits), or stops on bad input with exit status 2 and ONE line on stderr,

    herd <command>: error: <what is wrong, naming the file>

the same shape as argparse's own errors, so a typo in an option and a typo in a file name read alike.
`herd.cli.main` does the conversion with `one_line_error`; `HERD_DEBUG=1` re-raises instead, so that a
real bug keeps its traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

DEBUG_ENV = "HERD_DEBUG"
DATA_EXTRA_HINT = "pip install 'herd[data]'"


class UsageError(SystemExit):
    """A command line that cannot work (options that contradict or miss each other).

    A `SystemExit` with status 2, as argparse's own errors are, so a caller of `herd.cli.main` sees both
    kinds the same way; `str(error)` is the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def _pil_errors() -> tuple[type[BaseException], ...]:
    """PIL's "this image cannot be read" errors; UnidentifiedImageError is already an OSError."""
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency, but the error path must not be the thing that fails
        return ()
    return (Image.DecompressionBombError,)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong", not "herd has a bug".

    ConfigError, CheckpointError, json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors;
    FileNotFoundError, PermissionError and PIL's UnidentifiedImageError are OSErrors. KeyError comes
    from a config or record missing a key; ImportError from a missing optional extra (see
    `one_line_error`, which lets a missing *herd* module through as the bug it is).
    """
    return (ValueError, OSError, KeyError, ImportError, *_pil_errors())


def is_bad_input(error: BaseException) -> bool:
    if isinstance(error, ImportError) and (error.name or "").split(".")[0] == "herd":
        return False  # herd importing its own missing module is a bug, not an install problem
    return isinstance(error, bad_input_errors())


_OS_ERROR_WORDS = {
    FileNotFoundError: "not found",
    NotADirectoryError: "not a directory",
    IsADirectoryError: "is a directory, a file was expected",
    PermissionError: "permission denied",
}


def describe(error: BaseException) -> str:
    """The message of a bad-input error, with the file in front where the exception carries it."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        files = f"{error.filename} → {error.filename2}" if error.filename2 else str(error.filename)
        return f"{files}: {error.strerror}"
    if isinstance(error, OSError) and len(error.args) == 1 and " " not in str(error.args[0]):
        # FileNotFoundError(path): the message is the bare path; say what is wrong with it
        return f"{error.args[0]}: {_OS_ERROR_WORDS.get(type(error), 'cannot be read')}"
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else ""
        # KeyError("some sentence") carries a message; KeyError("lr") only the key that was missing
        return key if isinstance(key, str) and " " in key else f"missing key {key!r}"
    if isinstance(error, ImportError) and error.name and error.name not in str(error):
        return f"{error} (missing module {error.name})"
    return str(error) or type(error).__name__


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def one_line_error(command: str, error: BaseException) -> str:
    """`herd <command>: error: <message>` on one line (newlines inside the message become "; ")."""
    message = " ".join(part.strip() for part in describe(error).splitlines() if part.strip())
    return f"{command}: error: {message}"


def require(*modules: str, hint: str = DATA_EXTRA_HINT) -> None:
    """Fail before any work when an optional dependency is missing, saying how to install it."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"this command needs {', '.join(missing)}: {hint}", name=missing[0])


def print_summary(report: dict[str, Any], keys: tuple[str, ...]) -> int:
    """Print the named fields of a library report as JSON on stdout (what the data commands return)."""
    print(json.dumps({k: report.get(k) for k in keys}, indent=2, default=str))
    return 0


def warn(message: str) -> None:
    """One line on stderr that does not stop the command."""
    print(message, file=sys.stderr)


__all__ = [
    "DEBUG_ENV",
    "UsageError",
    "bad_input_errors",
    "debug_enabled",
    "describe",
    "is_bad_input",
    "one_line_error",
    "print_summary",
    "require",
    "warn",
]
