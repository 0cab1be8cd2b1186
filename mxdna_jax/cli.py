"""What the command-line programs (train.py, eval.py, `python -m mxdna_jax.convert`) share:
exit codes, one-line error reporting, and path resolution.

Exit codes (README "Exit codes"):
  0   success
  1   an unexpected error (a bug: the traceback is printed)
  2   bad input: config, data, workdir, checkpoint or command line; nothing was written
  3   non-finite loss; the bad update was not applied, the last good checkpoint is kept
  4   a checkpoint could not be written (disk full, permissions); the previous one is intact
  75  preempted (SIGTERM/SIGINT): a checkpoint of the current step was written; run the same
      command again to resume (75 is EX_TEMPFAIL: "temporary failure, retry")
"""

from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT_FAILED = 4
EXIT_PREEMPTED = 75


class UserError(ValueError):
    """A problem with the inputs (config, data, workdir, checkpoint) reported as one line,
    without a traceback, before anything is written."""


def abspath(path: str | os.PathLike | None) -> str | None:
    """An absolute, user-expanded path (Orbax and worker processes need absolute paths; the
    entry points resolve every user path once, here, so a relative --workdir means the
    directory it names at start-up)."""
    if path is None or str(path) == "":
        return path
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def one_line(message: object) -> str:
    """The first line of an error message, capped (tensorstore errors embed whole JSON specs)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    return text if len(text) <= 500 else text[:500] + " ..."


def fail(message: object, code: int = EXIT_BAD_INPUT) -> int:
    """Print `error: <one line>` to stderr and return `code` (for `return fail(...)` in main)."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return code
