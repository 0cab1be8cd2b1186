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


def parse_flags(argv):
    """absl's flag parser for the entry points (`app.run(..., flags_parser=cli.parse_flags)`), with
    mistakes reported as one line and exit 2 instead of a traceback: a bad value, an unknown flag,
    or a typo in a config override (`--config.train.stesp`, raised from inside ml_collections)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(fail(e))
    except OSError as e:  # config_flags: a --config file that is missing or fails to load
        sys.exit(fail("--config: " + " ".join(str(e).split())))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raw = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
        key, _, hint = raw.strip("'\" ").partition("\n")
        key = key.strip("'\" ")
        named = [a for a in argv[1:] if a.startswith("--config.") and f".{key}" in a.split("=")[0]]
        where = named[0] if named else "a --config override"
        sys.exit(fail(f"{where}: no config field {key!r}" + (f"; {hint.strip()}" if hint else "")))


def default_config_flag(script: str, module_name: str) -> None:
    """Run as a script without --config: use the repository's configs/tiny.py (wherever the
    command is run from). Inserted as an explicit --config rather than a flag default, because
    config_flags parses a default, with every --config.x override, while the flag is being
    defined: outside `parse_flags`' one-line error handling. Call before DEFINE_config_file."""
    if module_name == "__main__" and not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--config={os.path.join(os.path.dirname(os.path.abspath(script)), 'configs', 'tiny.py')}")
