"""Orbax checkpoints that survive a bad latest step.

One step directory holds:
  <name>/          one `StandardSave` item per array tree (params, opt_state), sharded, written by
                   every process; restored onto whatever shardings the caller's abstract tree has,
                   so a different mesh shape just works.
  meta/            `JsonSave`: step, rng, config, anything JSON-able.
  data/            this module's `DataStateSave`: one JSON file per process with its data
                   iterator's state (an opaque dict, or bytes stored as base64).
  mxdna_manifest.json   size + sha256 of every other file, written by process 0 once orbax has
                   finalised the step.

`restore_latest` walks the steps newest first and uses the first one that passes all checks
(commit marker present, manifest matches, orbax restore succeeds), logging for each rejected one
which step and what failed. Nothing is deleted. Before the next save, rejected steps newer than
the restored one are renamed to `<step>.unusable-<time>` so orbax (which refuses to save a step
at or below its latest) can write the new timeline.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

MANIFEST = "mxdna_manifest.json"
COMMIT_MARKER = "commit_success.txt"  # orbax 0.12 writes it in both atomicity modes
_BYTES_KEY = "__bytes_b64__"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- per-process data-iterator state


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes/reads `process_<i>-of-<n>.json` (cf. grain's own handler, which needs
    a grain iterator object; this one takes the state itself, so any `get_state()` works)."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave):
        state = args.state
        if isinstance(state, (bytes, bytearray)):
            state = {_BYTES_KEY: base64.b64encode(bytes(state)).decode("ascii")}
        self._file(directory).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        f = self._file(directory)
        if not f.exists():
            # Not corruption: typically a different process count than at save time. The params are
            # still good; the data position cannot be mapped and restarts.
            found = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
            log.warning("no data-iterator state %s in %s (found %s; saved with another process count?): "
                        "the data iterator restarts from its beginning", f.name, directory, found)
            return None
        state = json.loads(f.read_text())
        if isinstance(state, dict) and set(state) == {_BYTES_KEY}:
            state = base64.b64decode(state[_BYTES_KEY])
        return state

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------- manifest


def _files(step_dir: epath.Path) -> list[epath.Path]:
    out, todo = [], [step_dir]
    while todo:  # epath's rglob refuses '**' (GCS); a step has only dozens of files
        for p in todo.pop().iterdir():
            if p.is_dir():
                todo.append(p)
            elif p.name != MANIFEST:
                out.append(p)
    return sorted(out)


def _digest(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: epath.PathLike) -> None:
    step_dir = epath.Path(step_dir)
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().length, "sha256": _digest(p)}
               for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    tmp.rename(step_dir / MANIFEST)


def check_step_dir(step_dir: epath.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems found in a finalised step directory (empty list = looks intact)."""
    step_dir = epath.Path(step_dir)
    if not step_dir.exists():
        return [f"{step_dir} does not exist"]
    problems = []
    if not (step_dir / COMMIT_MARKER).exists():
        problems.append(f"commit marker {COMMIT_MARKER} is missing (save did not finish)")
    manifest = step_dir / MANIFEST
    if checksums and manifest.exists():
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as e:
            return problems + [f"{MANIFEST} is unreadable: {e}"]
        for rel, want in entries.items():
            p = step_dir / rel
            if not p.exists():
                problems.append(f"{rel}: missing")
            elif p.stat().length != want["size"]:
                problems.append(f"{rel}: size {p.stat().length} != {want['size']} (truncated?)")
            elif _digest(p) != want["sha256"]:
                problems.append(f"{rel}: sha256 mismatch (corrupted)")
    return problems


# ---------------------------------------------------------------- manager


@dataclasses.dataclass
class Restored:
    step: int
    arrays: dict[str, Any]  # name -> restored tree (on the requested shardings)
    meta: dict[str, Any]
    data_state: Any  # None when the checkpoint has none for this process


class CheckpointManager:
    """Thin wrapper over `ocp.CheckpointManager` (the loop decides when to save)."""

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True,
                 checksums: bool = True):
        self.directory = epath.Path(directory)
        self.checksums = checksums
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))
        self._unusable: list[int] = []  # steps rejected by restore_latest, newer than the restored one
        self._manifest_thread: threading.Thread | None = None
        self._saved = threading.Event()  # set once orbax reports the pending save finished

    # -- saving

    def save(self, step: int, arrays: Mapping[str, Any], *, meta: Mapping[str, Any],
             data_state: Any = None) -> None:
        """Start saving (async if enabled). Arrays are copied off device before this returns, so
        the caller may donate/overwrite them right after."""
        self._finish_pending()
        self._quarantine_unusable()
        _check_names(arrays)
        items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        items["meta"] = ocp.args.JsonSave(dict(meta, step=int(step)))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self._mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
        if self.checksums and jax.process_index() == 0:
            # Hash the files as soon as orbax commits them, not at the next save: a crash in
            # between would otherwise leave the newest checkpoint unverifiable.
            self._saved.clear()
            self._manifest_thread = threading.Thread(target=self._manifest_when_committed, args=(int(step),),
                                                     name=f"mxdna-manifest-{step}", daemon=True)
            self._manifest_thread.start()

    def wait_until_finished(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self._mgr.close()

    def reached_preemption(self, step: int) -> bool:
        return self._mgr.reached_preemption(step)

    def _finish_pending(self) -> None:
        try:
            self._mgr.wait_until_finished()
        finally:
            self._saved.set()
            if self._manifest_thread is not None:
                self._manifest_thread.join()
                self._manifest_thread = None

    def _manifest_when_committed(self, step: int) -> None:
        step_dir = self.step_dir(step)
        marker = step_dir / COMMIT_MARKER
        while not marker.exists():
            if self._saved.wait(0.5) and not marker.exists():
                log.error("checkpoint step %d did not commit; no manifest written", step)
                return
        try:
            write_manifest(step_dir)
        except Exception as e:  # the checkpoint itself is fine, only unverifiable
            log.error("could not write the manifest of checkpoint step %d: %s: %s", step, type(e).__name__, e)

    def _quarantine_unusable(self) -> None:
        if not self._unusable:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in self._unusable:
                src = self.step_dir(step)
                if src.exists():
                    dst = src.parent / f"{src.name}.unusable-{stamp}"
                    log.warning("moving unusable checkpoint step %d aside: %s -> %s", step, src, dst)
                    src.rename(dst)
        self._unusable = []
        # Other processes must not race ahead of the renames (shared filesystem).
        ocp.multihost.sync_global_processes("mxdna_quarantine_unusable")
        self._mgr.reload()

    # -- restoring

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def restore(self, step: int, abstract_arrays: Mapping[str, Any],
                validate_meta: Callable[[dict], None] | None = None) -> Restored:
        """Restore one step onto the shardings of `abstract_arrays` (trees of ShapeDtypeStruct
        with `.sharding`). Raises CorruptCheckpointError on any damage; `validate_meta(meta)` runs
        on the metadata before any array is read, and what it raises (e.g. a config mismatch,
        which no older step would fix) propagates unchanged."""
        step_dir = self.step_dir(step)
        _check_names(abstract_arrays)
        # Every phase ends with all processes agreeing, so they never diverge on which step they
        # restore. The file checks (hashing everything) run on process 0 only.
        problems = check_step_dir(step_dir, checksums=self.checksums) if jax.process_index() == 0 else []
        _agree(step, step_dir, problems)
        problems, meta = [], {}
        try:
            meta = dict(self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            if int(meta.get("step", step)) != step:
                problems = [f"metadata says step {meta['step']}"]
        except Exception as e:
            problems = [f"metadata: {type(e).__name__}: {e}"]
        _agree(step, step_dir, problems)
        if validate_meta is not None:
            validate_meta(meta)
        items = {k: ocp.args.StandardRestore(v) for k, v in abstract_arrays.items()}
        has_data = (step_dir / "data").exists()
        if has_data:
            items["data"] = DataStateRestore()
        out, problems = None, []
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            problems = [f"{type(e).__name__}: {e}"]
        _agree(step, step_dir, problems)
        return Restored(step=step, arrays={k: out[k] for k in abstract_arrays}, meta=meta,
                        data_state=out["data"] if has_data else None)

    def restore_latest(self, abstract_arrays: Mapping[str, Any],
                       validate_meta: Callable[[dict], None] | None = None) -> Restored | None:
        """Newest usable checkpoint, or None when there are none. Raises when checkpoints exist but
        none is usable (starting from scratch over them would be a silent surprise)."""
        self._finish_pending()
        steps = self.all_steps()
        rejected = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, abstract_arrays, validate_meta)
            except CorruptCheckpointError as e:
                older = [s for s in steps if s < step]
                log.error("%s; %s", e, f"falling back to step {older[-1]}" if older else "no older step left")
                rejected.append(step)
                continue
            if rejected:
                log.warning("resuming from step %d instead of the newest step %d (rejected: %s); "
                            "nothing was deleted", step, steps[-1], rejected)
            self._unusable = rejected
            return restored
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} is usable; "
                               "see the errors above. Move them aside to start from scratch.")
        return None


def _agree(step: int, step_dir, problems: list[str]) -> None:
    """Raise CorruptCheckpointError on every process if any process found a problem."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        bad = multihost_utils.process_allgather(np.asarray(bool(problems)))
        if np.any(bad) and not problems:
            problems = [f"process(es) {np.flatnonzero(bad).tolist()} failed to read it (see their logs)"]
    if problems:
        raise CorruptCheckpointError(step, step_dir, problems)


def _check_names(arrays: Mapping[str, Any]) -> None:
    bad = set(arrays) & {"meta", "data"}
    if bad:
        raise ValueError(f"array item names {sorted(bad)} are reserved")


class CorruptCheckpointError(RuntimeError):
    def __init__(self, step: int, path: epath.Path, problems: list[str]):
        self.step, self.path, self.problems = step, path, problems
        # tensorstore errors embed whole JSON specs: keep the head of each.
        shown = [p if len(p) <= 400 else p[:400] + " ..." for p in problems[:5]]
        shown += [f"... and {len(problems) - 5} more"] if len(problems) > 5 else []
        super().__init__(f"checkpoint step {step} at {path} is unusable: " + "; ".join(shown))
