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

Every step is verifiable twice over: by the manifest (file level), and by the content
fingerprints of its array trees, stored in `meta` under FINGERPRINT_KEY. The manifest is written
by a thread after orbax commits, so a kill in between leaves a committed step without one; the
fingerprints are part of the same orbax commit, so such a step is still checked (on restore the
arrays' fingerprints are recomputed and compared). A step with neither (written by an older
version) is rejected as unverifiable unless the manager is built with `allow_unverified=True`.

`restore_latest` walks the steps newest first and uses the first one that passes all checks
(commit marker present, manifest matches, orbax restore succeeds, fingerprints match), logging
for each rejected one which step and what failed. Nothing is deleted. Before the next save,
rejected steps newer than the restored one are renamed to `<step>.unusable-<time>` so orbax
(which refuses to save a step at or below its latest) can write the new timeline.

A save that fails (disk full, permissions) raises CheckpointSaveError, one line naming the step,
the OS error and the previous intact step: from `poll_errors()` (non-blocking, for the training
loop after every step), `save()`, `wait_until_finished()` or `close()`, once. The failed step's
files stay in orbax's `<step>.orbax-checkpoint-tmp` directory, which is never listed as a step,
and retention deletes nothing after a failed save.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

MANIFEST = "mxdna_manifest.json"
COMMIT_MARKER = "commit_success.txt"  # orbax 0.12 writes it in both atomicity modes
META_FILE = "metadata"  # what orbax's JsonSave writes inside the `meta` item directory
FINGERPRINT_KEY = "mxdna_fingerprints"  # in the meta item: {"version": 1, "items": {name: {leaf: fp}}}
FINGERPRINT_VERSION = 1
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


# ---------------------------------------------------------------- content fingerprints

# Per leaf, two sums mod 2**32 of the array's bits as uint32 words, each word times a
# position-dependent odd weight. Modular sums are exact and order-independent, so the sharded
# on-device sum (any mesh, any process count) and the host sum over numpy agree bit for bit. An
# odd weight times any nonzero difference below 2**32 is nonzero mod 2**32, so any change to one
# element (a flipped bit or byte) always changes both sums; the second sum mixes the word first
# (an invertible xorshift) so that changes to several elements are unlikely to cancel in both.
_MUL_1, _ADD_1 = 0x9E3779B1, 0x7F4A7C15
_MUL_2, _ADD_2 = 0x85EBCA77, 0x165667B1
_MASK32 = 0xFFFFFFFF


def leaf_name(path) -> str:
    """'mu/w_in/value'-style name of a pytree path: the same for an nnx.State (attribute keys)
    and for the nested dicts/lists orbax restores without a target (dict keys)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _words_u32(x):
    """The array's bits as uint32 words of the same shape (64-bit words: both halves folded)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], -1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    if bits == 64:
        return (u & _MASK32).astype(jnp.uint32) + (u >> 32).astype(jnp.uint32) * jnp.uint32(_MUL_2)
    return u.astype(jnp.uint32)


def _flat_index_u32(shape):
    """Row-major element index mod 2**32, built from iotas (no reshape: keeps the sharding)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride & _MASK32)
        stride *= shape[d]
    return idx


def _sums_device(x):
    u = _words_u32(x)
    i = _flat_index_u32(u.shape)
    w1 = (i * jnp.uint32(_MUL_1) + jnp.uint32(_ADD_1)) | jnp.uint32(1)
    w2 = ((i ^ jnp.uint32(_ADD_2)) * jnp.uint32(_MUL_2)) | jnp.uint32(1)
    mixed = u ^ (u >> 15)
    return jnp.stack([jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum(mixed * w2, dtype=jnp.uint32)])


@jax.jit
def _tree_sums_device(leaves_N):
    return jnp.stack([_sums_device(x) for x in leaves_N])


def _sums_host(x) -> tuple[int, int]:
    """_sums_device on the host, for numpy leaves (restored without a mesh)."""
    x = np.ascontiguousarray(x)
    if np.iscomplexobj(x):
        x = np.ascontiguousarray(np.stack([x.real, x.imag], -1))
    if x.dtype == np.bool_:
        u = x.astype(np.uint32)
    else:
        u = x.view(np.dtype(f"uint{x.dtype.itemsize * 8}"))
        if x.dtype.itemsize == 8:
            u = (u & np.uint64(_MASK32)).astype(np.uint32) + (u >> np.uint64(32)).astype(np.uint32) * np.uint32(_MUL_2)
        else:
            u = u.astype(np.uint32)
    i = (np.arange(u.size, dtype=np.uint64) & np.uint64(_MASK32)).astype(np.uint32).reshape(u.shape)
    w1 = (i * np.uint32(_MUL_1) + np.uint32(_ADD_1)) | np.uint32(1)
    w2 = ((i ^ np.uint32(_ADD_2)) * np.uint32(_MUL_2)) | np.uint32(1)
    mixed = u ^ (u >> np.uint32(15))
    return int(np.sum(u * w1, dtype=np.uint32)), int(np.sum(mixed * w2, dtype=np.uint32))


def fingerprint(tree) -> dict[str, list]:
    """{leaf name: [dtype, shape, 16 hex digits]} of an array tree (jax arrays on any mesh, or
    numpy arrays); identical for the same contents however they are sharded or where they are."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums: dict[int, tuple[int, int]] = {}
    on_device = [i for i, (_, x) in enumerate(flat) if isinstance(x, jax.Array)]
    if on_device:
        out_N2 = _tree_sums_device([flat[i][1] for i in on_device])
        if not out_N2.is_fully_addressable:  # arrays spanning processes: every process gets the sums
            from jax.experimental import multihost_utils

            out_N2 = multihost_utils.process_allgather(out_N2, tiled=True)
        for i, row in zip(on_device, np.asarray(jax.device_get(out_N2))):
            sums[i] = (int(row[0]), int(row[1]))
    out = {}
    for i, (path, x) in enumerate(flat):
        s = sums[i] if i in sums else _sums_host(np.asarray(x))
        out[leaf_name(path)] = [str(x.dtype), [int(d) for d in np.shape(x)], f"{s[0]:08x}{s[1]:08x}"]
    return out


def fingerprint_mismatches(item: str, saved: Mapping[str, list], tree) -> list[str]:
    """Problems found comparing `tree` (restored item `item`) with its saved fingerprints."""
    problems = []
    for leaf, (dtype, shape, digest) in fingerprint(tree).items():
        want = saved.get(leaf)
        if want is None:
            problems.append(f"{item}/{leaf}: no saved fingerprint")
        elif (want[0], list(want[1])) != (dtype, shape):
            # Restored as another dtype (a cast on restore): the bits are not comparable.
            log.info("%s/%s restored as %s%s, saved as %s%s: fingerprint not compared", item, leaf, dtype, shape,
                     want[0], want[1])
        elif want[2] != digest:
            problems.append(f"{item}/{leaf}: content fingerprint {digest} != saved {want[2]} (corrupted)")
    return problems


UNVERIFIABLE = (f"unverifiable: it has neither {MANIFEST} nor array fingerprints in its metadata (saved by an "
                "older version and interrupted before the manifest was written?); it may be damaged")


def read_meta(step_dir: epath.PathLike) -> dict:
    """A step's `meta` item as written by orbax's JsonSave (read without orbax, for tools)."""
    return json.loads((epath.Path(step_dir) / "meta" / META_FILE).read_text())


def verification_problems(step_dir: epath.PathLike, meta: Mapping[str, Any], arrays: Mapping[str, Any], *,
                          allow_unverified: bool = False) -> list[str]:
    """What is wrong with restored `arrays` (item name -> tree) of a step, judged by the fingerprints
    in its `meta`; a step without fingerprints must have a manifest (checked by check_step_dir)."""
    saved = meta.get(FINGERPRINT_KEY)
    if saved is None:
        return [] if allow_unverified or (epath.Path(step_dir) / MANIFEST).exists() else [UNVERIFIABLE]
    if saved.get("version") != FINGERPRINT_VERSION:
        return [f"unknown fingerprint version {saved.get('version')!r} (written by a newer version?)"]
    problems = []
    for name, tree in arrays.items():
        if name not in saved["items"]:
            problems.append(f"{name}: no saved fingerprints")
        else:
            problems += fingerprint_mismatches(name, saved["items"][name], tree)
    return problems


# ---------------------------------------------------------------- save failures


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); one line, the previous
    checkpoint named. The training loop exits with cli.EXIT_CHECKPOINT_FAILED on it."""

    def __init__(self, step: int, path, reason: str, previous: int | None):
        self.step, self.path, self.reason, self.previous = step, str(path), reason, previous
        prev = "none" if previous is None else str(previous)
        super().__init__(f"checkpoint step {step} could not be written to {path}: {reason}; "
                         f"the previous checkpoint (step {prev}) is intact")


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_text(e: BaseException) -> str | None:
    """'[Errno 28] No space left on device' for an OSError anywhere in `e`'s chain, or for a
    tensorstore error carrying os_error_code (what orbax raises for a failed write); else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            code = int(m.group(1))
            return f"[Errno {code}] {os.strerror(code)}"
        e = e.__cause__ or e.__context__
    return None


class _QuietIOErrorTracebacks(logging.Filter):
    """Drops the tracebacks (not the messages) orbax logs, several times over, for a failed write
    whose cause is an OS error: CheckpointSaveError reports it in one line; a traceback of the
    same I/O error through orbax's threads is hundreds of lines of noise. Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in (record.pathname or "") and record.exc_info[1] is not None \
                and os_error_text(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


# ---------------------------------------------------------------- manager


@dataclasses.dataclass
class Restored:
    step: int
    arrays: dict[str, Any]  # name -> restored tree (on the requested shardings)
    meta: dict[str, Any]
    data_state: Any  # None when the checkpoint has none for this process


class CheckpointManager:
    """Thin wrapper over `ocp.CheckpointManager` (the loop decides when to save).

    `allow_unverified=True` accepts steps that have neither a manifest nor fingerprints (written
    by an older version and interrupted before the manifest was written) with a warning; by
    default they are rejected like damaged ones.
    """

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True,
                 checksums: bool = True, allow_unverified: bool = False):
        self.directory = epath.Path(directory)
        self.checksums = checksums
        self.allow_unverified = allow_unverified
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))
        self._quiet = _QuietIOErrorTracebacks()
        logging.getLogger("absl").addFilter(self._quiet)  # orbax logs through absl; removed in close()
        self._unusable: list[int] = []  # steps rejected by restore_latest, newer than the restored one
        self._manifest_thread: threading.Thread | None = None
        self._saved = threading.Event()  # set once orbax reports the pending save finished
        self._pending_step: int | None = None  # a started save not yet known to have finished
        self._failure: CheckpointSaveError | None = None
        self._failure_reported = False  # raised to the caller once; later calls stay quiet
        self._closed = False

    # -- saving

    def save(self, step: int, arrays: Mapping[str, Any], *, meta: Mapping[str, Any],
             data_state: Any = None) -> None:
        """Start saving (async if enabled). Arrays are copied off device before this returns, so
        the caller may donate/overwrite them right after. Raises CheckpointSaveError if an earlier
        save failed (and it was not reported yet) or if this one fails synchronously."""
        self._finish_pending()
        self._raise_failure()
        self._quarantine_unusable()
        _check_names(arrays)
        if FINGERPRINT_KEY in meta:
            raise ValueError(f"meta key {FINGERPRINT_KEY!r} is reserved")
        # Computed from the arrays themselves (before the async copy): they describe what this
        # step must restore to, and travel in the same orbax commit as the arrays.
        fingerprints = {"version": FINGERPRINT_VERSION, "items": {k: fingerprint(v) for k, v in arrays.items()}}
        items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        items["meta"] = ocp.args.JsonSave(dict(meta, step=int(step), **{FINGERPRINT_KEY: fingerprints}))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self._check_free_space(int(step), arrays)
        self._pending_step = int(step)
        try:
            self._mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            if os_error_text(e) is None:  # not a write failure: a bug or bad arguments
                self._pending_step = None
                raise
            self._record_failure(int(step), e)
            self._raise_failure()
        if self.checksums and jax.process_index() == 0:
            # Hash the files as soon as orbax commits them, not at the next save: a crash in
            # between would otherwise leave the newest checkpoint unverifiable.
            self._saved.clear()
            self._manifest_thread = threading.Thread(target=self._manifest_when_committed, args=(int(step),),
                                                     name=f"mxdna-manifest-{step}", daemon=True)
            self._manifest_thread.start()

    def _check_free_space(self, step: int, arrays: Mapping[str, Any]) -> None:
        """Refuse a save that cannot fit before orbax starts it: a save that runs out of space
        half-way fails in a dozen background threads at once. The arrays are written
        uncompressed, so their byte count is a lower bound of what the step needs (a save this
        lets through can still fail, and is then reported by poll_errors). Single-process runs on
        a local filesystem only: elsewhere each process writes part of the bytes, or free space
        is not a meaningful number."""
        if jax.process_count() > 1:
            return
        try:
            free = shutil.disk_usage(os.fspath(self.directory)).free
        except (OSError, TypeError, ValueError):
            return
        need = sum(int(x.nbytes) for x in jax.tree.leaves(arrays) if hasattr(x, "nbytes"))
        if need > free:
            self._failure = CheckpointSaveError(
                step, self.step_dir(step), f"[Errno 28] No space left on device (needs at least "
                f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB free)", self._previous_committed(step))
            self._failure_reported = False
            self._raise_failure()

    def poll_errors(self) -> None:
        """Raise CheckpointSaveError if a started async save has failed; never blocks on a save
        in progress (call it after every training step)."""
        if self._pending_step is not None and not self._mgr.is_saving_in_progress():
            self._collect_pending()  # orbax is done: this returns at once
        self._raise_failure()

    def wait_until_finished(self) -> None:
        """Block until the pending save is written; CheckpointSaveError if it failed."""
        self._finish_pending()
        self._raise_failure()

    def close(self) -> None:
        """Finish the pending save and release orbax. Raises CheckpointSaveError for a failed save
        not yet reported, and nothing else after one: safe in a `finally`."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_pending()
            try:
                self._mgr.close()
            except Exception as e:  # orbax re-raises a failed save's error, once per thread
                if self._failure is None:
                    raise
                log.debug("orbax close after the failed save of step %d: %s", self._failure.step, e)
        finally:
            logging.getLogger("absl").removeFilter(self._quiet)
        self._raise_failure()

    def reached_preemption(self, step: int) -> bool:
        return self._mgr.reached_preemption(step)

    def _finish_pending(self) -> None:
        try:
            self._collect_pending()
        finally:
            self._saved.set()
            if self._manifest_thread is not None:
                self._manifest_thread.join()
                self._manifest_thread = None

    def _collect_pending(self) -> None:
        """Wait for orbax's pending save; record (not raise) its failure."""
        step, self._pending_step = self._pending_step, None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            if step is None:
                raise
            self._record_failure(step, e)

    def _record_failure(self, step: int, e: BaseException) -> None:
        reason = os_error_text(e) or one_line_error(e)
        self._failure = CheckpointSaveError(step, self.step_dir(step), reason, self._previous_committed(step))
        self._failure_reported = False
        log.debug("checkpoint step %d failed", step, exc_info=e)

    def _raise_failure(self) -> None:
        if self._failure is not None and not self._failure_reported:
            self._failure_reported = True
            raise self._failure

    def _previous_committed(self, step: int) -> int | None:
        try:
            done = [int(p.name) for p in self.directory.iterdir()
                    if p.name.isdigit() and int(p.name) < step and (p / COMMIT_MARKER).exists()]
        except OSError:
            return None
        return max(done, default=None)

    def _manifest_when_committed(self, step: int) -> None:
        step_dir = self.step_dir(step)
        marker = step_dir / COMMIT_MARKER
        while not marker.exists():
            if self._saved.wait(0.5) and not marker.exists():
                if self._failure is None or self._failure.step != step:  # else CheckpointSaveError says it
                    log.error("checkpoint step %d did not commit; no manifest written", step)
                return
        try:
            write_manifest(step_dir)
        except Exception as e:  # the checkpoint is fine, and verifiable by its fingerprints
            log.warning("could not write the manifest of checkpoint step %d (its array fingerprints still "
                        "verify it): %s", step, one_line_error(e))

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
        with `.sharding`). Raises CorruptCheckpointError on any damage (including a step that
        cannot be verified); `validate_meta(meta)` runs on the metadata before any array is read,
        and what it raises (e.g. a config mismatch, which no older step would fix) propagates
        unchanged."""
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
        fingerprints = meta.pop(FINGERPRINT_KEY, None)
        has_manifest = (step_dir / MANIFEST).exists()
        if not problems and fingerprints is None and not has_manifest:
            if not self.allow_unverified:
                problems = [UNVERIFIABLE]
            else:
                log.warning("checkpoint step %d at %s is %s; loading it anyway (allow_unverified)",
                            step, step_dir, UNVERIFIABLE)
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
        arrays = {k: out[k] for k in abstract_arrays}
        if fingerprints is not None:
            # Every process computes the same (global) sums, so they agree without a vote.
            problems = verification_problems(step_dir, {FINGERPRINT_KEY: fingerprints}, arrays)
            _agree(step, step_dir, problems)
            if not has_manifest and self.checksums and jax.process_index() == 0:
                self._write_missing_manifest(step, step_dir)
        return Restored(step=step, arrays=arrays, meta=meta, data_state=out["data"] if has_data else None)

    def _write_missing_manifest(self, step: int, step_dir: epath.Path) -> None:
        """A step verified by its fingerprints gets the manifest its save could not write, so that
        file-level tools (check_step_dir) can check it too."""
        try:
            write_manifest(step_dir)
            log.info("checkpoint step %d had no %s; verified by its fingerprints, manifest written", step, MANIFEST)
        except Exception as e:  # e.g. a read-only copy: the step is still good
            log.warning("could not write the missing manifest of checkpoint step %d: %s", step, one_line_error(e))

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


def one_line_error(e: BaseException) -> str:
    """`Type: first line` of an exception, capped (tensorstore errors embed whole JSON specs)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


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
