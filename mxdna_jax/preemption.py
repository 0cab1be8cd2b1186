"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint it, exit with EXIT_PREEMPTED.

TPU and cloud preemptions (and SLURM's time limit) send SIGTERM and kill the process a little
later; Ctrl-C sends SIGINT. Both only set a flag here; the training loop checks it after each
step (`should_stop`), writes a checkpoint of that step, waits for it, and raises `Preempted`.
A second SIGINT aborts at once (KeyboardInterrupt) for a user who does not want to wait.

Multi-process runs must stop at the same step on every process, or the collective checkpoint
save would deadlock: `should_stop` all-gathers the local flags, so a signal delivered to any one
process stops all of them after the same step. (JAX's own preemption sync point only listens to
SIGTERM through the coordination service; this handler replaces it so one mechanism serves both
signals and single-process runs, and `reached_preemption` is still consulted for schedulers that
notify through that service.)
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the training loop after the checkpoint of `step` has been written."""

    def __init__(self, step: int, checkpoint_dir: str, signal_name: str):
        self.step, self.checkpoint_dir, self.signal_name = step, checkpoint_dir, signal_name
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint written to {checkpoint_dir}; "
                         "run the same command again to resume")


class StopSignal:
    """Context manager: installs the SIGTERM/SIGINT handlers (main thread only) and restores the
    previous ones on exit. Outside the main thread (e.g. a notebook worker) it installs nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the save
        self.received = self.received or name
        # A log line, not a print: the tqdm bar owns the terminal.
        log.warning("%s received: finishing this step, writing a checkpoint, then exiting "
                    "(Ctrl-C again aborts without saving)", name)

    def request(self, name: str = "request") -> None:
        """Ask for a stop from code (tests, notebooks)."""
        self.received = self.received or name

    def should_stop(self, step: int, reached_preemption=None) -> bool:
        """True on every process when any process got a signal (or the scheduler's sync point
        `reached_preemption(step)` says so). Every process must call this after every step."""
        local = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray(local))
            if np.any(flags) and not local:
                self.received = "a signal on another process"
            local = bool(np.any(flags))
        if not local and reached_preemption is not None and reached_preemption(step):
            self.received = "the preemption sync point"
            local = True
        return local
