"""A run's working directory: checked before anything is written, and locked while a run owns it.

Two train.py runs on one workdir would interleave metrics.jsonl and leave a config.json that
describes one run beside checkpoints of the other. `WorkdirLock` holds an exclusive `flock` on
`WORKDIR/.lock` for the life of the run. The kernel drops an flock when its process dies, so a
lock left by a killed run is simply acquired again ("stale lock ... taken over"); the file's
JSON body (pid, host, start time) only serves the messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time

import numpy as np

from mxdna_jax.cli import UserError

LOCK_NAME = ".lock"

log = logging.getLogger(__name__)


def check_writable(workdir: str) -> None:
    """UserError unless `workdir` is (or can be created as) a writable directory. Writes nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    probe = workdir
    while not os.path.exists(probe):  # the nearest existing ancestor decides whether mkdir works
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"--workdir {workdir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir}: {probe} is not writable")


class WorkdirLock:
    """Exclusive lock on a workdir (process 0 of a run takes it; see `pretrain.run`)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale holder's info when a dead run's lock was taken over

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise UserError(f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to "
                            "finish or stop it, or use another --workdir") from None
        previous = _read(fd)
        if previous.get("pid"):
            # We got the flock, so its holder is gone (or never released it cleanly).
            log.warning("taking over the stale lock of %s in %s (that process is no longer running)",
                        _describe(previous), os.path.dirname(self.path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        self.took_over = previous if previous.get("pid") else None
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly, nothing to take over
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


@contextlib.contextmanager
def locked(workdir: str):
    """Hold the workdir lock for the duration of a (possibly multi-process) run.

    Process 0 takes the lock; the others learn the outcome from it, so a refused run stops on
    every process with the same message instead of leaving the others waiting in a collective.
    """
    import jax

    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
        if refused and error is None:
            error = UserError(f"{workdir} is in use by another run (see process 0's message)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()
