"""Data layer under fault injection: damaged inputs and caches, bad config, a killed parent.

Every bad input must come out of the data layer as one exception type with a one-line message
naming the file (the entry points print it as `error: ...` and exit 2), and must leave no cache
behind; a damaged cache must be rebuilt, never crash or give wrong ids.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from mxdna_jax.data import Genome, PretrainData, PretrainDataConfig, fasta_eval_batches
from mxdna_jax.data import fasta as fasta_mod
from mxdna_jax.data import pipeline as pipeline_mod
from mxdna_jax.data.fasta import FastaNotFoundError, load_fasta_ids, parse_fasta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    # Nothing here may touch ~/.cache; tests that check the cache pass cache_dir explicitly.
    monkeypatch.setenv("MXDNA_CACHE", str(tmp_path / "default_cache"))


def fasta_text(seed=0, sizes=(3000, 1500)):
    rng = np.random.default_rng(seed)
    recs = [(f"chr{i}", "".join(rng.choice(list("ACGTN"), size=n))) for i, n in enumerate(sizes)]
    return "".join(f">{name} desc\n" + "".join(s[i : i + 60] + "\n" for i in range(0, len(s), 60)) for name, s in recs)


def error_of(fn, *args, **kw) -> Exception:
    """The exception `fn` raises, checked to be a ValueError with a one-line message."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return info.value


def assert_no_cache(cdir):
    assert not cdir.exists() or list(cdir.iterdir()) == [], list(cdir.iterdir())


# ------------------------------------------------------------------ damaged or wrong input files


def _truncate(data):
    return data[: len(data) // 2]


def _flip_middle(data):
    b = bytearray(data)
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0xFF
    return bytes(b)


def _trailing_garbage(data):
    return data + b"this is not gzip"


@pytest.mark.parametrize(
    "damage, cause",
    [
        (_truncate, r"EOFError: Compressed file ended before the end-of-stream marker was reached"),
        (_flip_middle, r"(zlib\.error: Error -3 while decompressing data: .*|gzip\.BadGzipFile: CRC check failed .*)"),
        (_trailing_garbage, r"gzip\.BadGzipFile: Not a gzipped file .*"),
    ],
    ids=["truncated", "corrupt", "trailing_garbage"],
)
def test_damaged_gzip_is_one_line_error_and_writes_no_cache(tmp_path, damage, cause):
    p = tmp_path / "genome.fa.gz"
    p.write_bytes(damage(gzip.compress(fasta_text().encode())))
    cdir = tmp_path / "cache"
    e = error_of(load_fasta_ids, p, cache_dir=cdir)
    assert type(e) is ValueError
    expected = rf"{re.escape(str(p))}: truncated or corrupt gzip file \({cause}\); re-download it"
    assert re.fullmatch(expected, str(e)), str(e)
    assert_no_cache(cdir)
    # The same error reaches the caller of PretrainData (train.py validates the corpus with it).
    cfg = PretrainDataConfig(fasta=(str(p),), window=62, global_batch_size=4, cache_dir=str(cdir))
    e2 = error_of(PretrainData, cfg)
    assert str(e2) == str(e)
    assert_no_cache(cdir)


def test_truncated_gzip_message_exact(tmp_path):
    p = tmp_path / "t.fa.gz"
    p.write_bytes(_truncate(gzip.compress(fasta_text().encode())))
    assert str(error_of(parse_fasta, p)) == (
        f"{p}: truncated or corrupt gzip file (EOFError: Compressed file ended before the end-of-stream "
        "marker was reached); re-download it"
    )


def test_binary_and_other_compressed_files_are_not_fasta(tmp_path):
    cdir = tmp_path / "cache"
    junk = np.random.default_rng(0).bytes(20_000)
    cases = {
        "random.bin": (junk, "not a FASTA file (binary data before any '>' header)"),
        "random.fa.gz": (gzip.compress(junk), "not a FASTA file (binary data before any '>' header)"),
        "nul.fa": (b">r1\nACGTACGT\nAC\x00\x01GT\n",
                   "not a FASTA file (binary byte 0x00 in record 'r1' at position 11)"),
        "x.fa.bz2": (b"BZh91AY&SY" + junk[:100],
                     "bzip2-compressed; only plain or gzip FASTA is read (recompress it with gzip)"),
        "x.fa.xz": (b"\xfd7zXZ\x00" + junk[:100],
                    "xz-compressed; only plain or gzip FASTA is read (recompress it with gzip)"),
    }
    for name, (content, expected) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        e = error_of(load_fasta_ids, p, cache_dir=cdir)
        assert type(e) is ValueError and str(e) == f"{p}: {expected}"
    # Text that is not FASTA keeps its own message (not called binary).
    (tmp_path / "notes.txt").write_text("hello world\n>x\nACGT\n")
    assert "before the first '>' header" in str(error_of(load_fasta_ids, tmp_path / "notes.txt", cache_dir=cdir))
    assert_no_cache(cdir)


def test_parse_error_writes_no_cache(tmp_path):
    p = tmp_path / "bad.fa"
    p.write_text(">ok\nACGT\n>bad\nACGTXACGT\n")
    cdir = tmp_path / "cache"
    e = error_of(Genome, p, cache_dir=cdir)
    assert str(e).startswith(f"{p}: record 'bad': invalid character 'X' at position 5")
    assert_no_cache(cdir)


def test_directory_missing_and_special_paths(tmp_path):
    d = tmp_path / "genomes"
    d.mkdir()
    e = error_of(load_fasta_ids, d, cache_dir=tmp_path / "cache")
    assert type(e) is ValueError and str(e) == f"{d} is a directory, not a FASTA file"
    e = error_of(PretrainData, PretrainDataConfig(fasta=(str(d),), window=62, global_batch_size=4))
    assert str(e) == f"{d} is a directory, not a FASTA file"

    missing = tmp_path / "missing.fa"
    e = error_of(load_fasta_ids, missing)
    # A FileNotFoundError for callers that catch that, and a ValueError for the entry points.
    assert isinstance(e, FastaNotFoundError) and isinstance(e, FileNotFoundError)
    assert str(e) == f"FASTA file not found: {missing}"
    e = error_of(fasta_eval_batches, str(missing), window=62, batch_size=2, n_batches=1)
    assert str(e) == f"FASTA file not found: {missing}"

    if os.path.exists("/dev/null"):
        e = error_of(load_fasta_ids, "/dev/null")
        assert str(e) == "/dev/null is not a regular file; give a FASTA or FASTA.gz file"
    assert_no_cache(tmp_path / "cache")


def test_unreadable_file_is_one_line_value_error(tmp_path, monkeypatch):
    p = tmp_path / "locked.fa"
    p.write_text(fasta_text())

    def denied(path):  # chmod 000 does not stop root, so inject the error
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(fasta_mod, "_open_fasta", denied)
    e = error_of(load_fasta_ids, p, cache_dir=tmp_path / "cache")
    assert type(e) is ValueError and str(e) == f"{p}: cannot read (Permission denied)"
    assert_no_cache(tmp_path / "cache")


# ------------------------------------------------------------------ damaged caches


def _overwrite(f, data):
    f.write_bytes(data)


def _corrupt(kind, npy, meta):
    raw = npy.read_bytes()
    header = len(raw) - np.load(npy).nbytes
    m = json.loads(meta.read_text())
    rng = np.random.default_rng(1)
    if kind == "npy_truncated":
        _overwrite(npy, raw[: len(raw) // 2])
    elif kind == "npy_header_only_truncated":
        _overwrite(npy, raw[:20])
    elif kind == "npy_garbage":
        _overwrite(npy, rng.bytes(len(raw)))
    elif kind == "npy_data_overwritten":  # valid header, same size, other (valid) ids: only the checksum sees it
        other = np.roll(np.load(npy), 7)
        _overwrite(npy, raw[:header] + other.tobytes())
    elif kind == "npy_wrong_length":
        np.save(npy, np.load(npy)[:-10])
    elif kind == "npy_wrong_dtype":
        np.save(npy, np.load(npy).astype(np.int16))
    elif kind == "npy_trailing_bytes":
        _overwrite(npy, raw + b"\0" * 64)
    elif kind == "npy_empty":
        _overwrite(npy, b"")
    elif kind == "npy_missing":
        npy.unlink()
    elif kind == "json_garbage":
        _overwrite(meta, rng.bytes(300))
    elif kind == "json_truncated":
        _overwrite(meta, meta.read_bytes()[:40])
    elif kind == "json_not_a_dict":
        _overwrite(meta, b"[1, 2, 3]")
    elif kind == "json_wrong_lengths":  # valid JSON, consistent-looking, but not the array's length
        m["lengths"] = [n - 5 for n in m["lengths"]]
        _overwrite(meta, json.dumps(m).encode())
    elif kind == "json_missing_checksum":
        del m["crc32"]
        _overwrite(meta, json.dumps(m).encode())
    elif kind == "json_other_key":
        m["key"] = "something else"
        _overwrite(meta, json.dumps(m).encode())
    else:
        raise AssertionError(kind)


CACHE_DAMAGE = [
    "npy_truncated", "npy_header_only_truncated", "npy_garbage", "npy_data_overwritten", "npy_wrong_length",
    "npy_wrong_dtype", "npy_trailing_bytes", "npy_empty", "npy_missing", "json_garbage", "json_truncated",
    "json_not_a_dict", "json_wrong_lengths", "json_missing_checksum", "json_other_key",
]


@pytest.mark.parametrize("kind", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt_with_warning(tmp_path, kind):
    p = tmp_path / "g.fa"
    p.write_text(fasta_text(seed=2))
    cdir = tmp_path / "cache"
    fresh_ids, fresh_names, fresh_lengths = parse_fasta(p)
    ids, _, _, npy = load_fasta_ids(p, cache_dir=cdir)
    assert isinstance(ids, np.memmap)
    del ids  # release the mapping before damaging the file
    meta = next(cdir.glob("*.json"))

    _corrupt(kind, npy, meta)
    with pytest.warns(UserWarning) as record:
        ids, names, lengths, npy2 = load_fasta_ids(p, cache_dir=cdir)
    msgs = [str(w.message) for w in record]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert msgs[0].startswith(f"ignoring damaged FASTA cache {npy} (")
    assert msgs[0].endswith(f"); rebuilding it from {p}")
    np.testing.assert_array_equal(ids, fresh_ids)
    assert (names, lengths, npy2) == (fresh_names, fresh_lengths, npy)

    # The rebuilt cache is whole: the next load maps it silently, and sampling works on it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, names, lengths, _ = load_fasta_ids(p, cache_dir=cdir)
        g = Genome(p, cache_dir=cdir)
    assert isinstance(ids, np.memmap)
    np.testing.assert_array_equal(ids, fresh_ids)
    np.testing.assert_array_equal(g.record(1), fresh_ids[fresh_lengths[0] :])
    assert sorted(f.name for f in cdir.iterdir()) == sorted([npy.name, meta.name])  # no stray tmp files


def test_good_cache_loads_without_warning_or_parse(tmp_path, monkeypatch):
    p = tmp_path / "g.fa"
    p.write_text(fasta_text(seed=3))
    cdir = tmp_path / "cache"
    ref = load_fasta_ids(p, cache_dir=cdir)

    def no_parse(*a, **k):
        raise AssertionError("a valid cache was parsed again")

    monkeypatch.setattr(fasta_mod, "parse_fasta", no_parse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_fasta_ids(p, cache_dir=cdir)
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[1:] == ref[1:]


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(window=0), "data.window must be > 0, got 0"),
        (dict(window=-5), "data.window must be > 0, got -5"),
        (dict(window="510"), "data.window must be an integer, got '510'"),
        (dict(window=62.0), "data.window must be an integer, got 62.0"),
        (dict(global_batch_size=0), "data.global_batch_size must be > 0, got 0"),
        (dict(max_tries=0), "data.max_tries must be > 0, got 0"),
        (dict(read_threads=0), "data.read_threads must be > 0, got 0"),
        (dict(prefetch_batches=0), "data.prefetch_batches must be > 0, got 0"),
        (dict(num_workers=-1), "data.num_workers must be >= 0, got -1"),
        (dict(min_val_windows=-1), "data.min_val_windows must be >= 0, got -1"),
        (dict(seed=None), "data.seed must be an integer, got None"),
        (dict(rc_prob=1.5), "data.rc_prob must be a number in [0, 1], got 1.5"),
        (dict(max_n_frac=-0.1), "data.max_n_frac must be a number in [0, 1], got -0.1"),
        (dict(val_fraction=float("nan")), "data.val_fraction must be a number in [0, 1], got nan"),
        (dict(mask_prob=0.0), "data.mask_prob must be a number in (0, 1], got 0.0"),
        (dict(mask_token_frac=0.9, random_token_frac=0.2),
         "data.mask_token_frac + data.random_token_frac must be <= 1, got 0.9 + 0.2"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(overrides, message):
    with pytest.raises(ValueError) as info:
        PretrainDataConfig(**overrides)
    assert str(info.value) == message


def test_fasta_eval_batches_argument_errors(tmp_path):
    p = tmp_path / "g.fa"
    p.write_text(fasta_text())
    for kw, message in ((dict(window=0), "window must be an integer > 0, got 0"),
                        (dict(batch_size=0), "batch_size must be an integer > 0, got 0"),
                        (dict(n_batches=-1), "n_batches must be an integer > 0, got -1")):
        args = dict(window=62, batch_size=2, n_batches=1) | kw
        assert str(error_of(fasta_eval_batches, str(p), **args)) == message


# ------------------------------------------------------------------ grain workers and a killed parent


def test_exit_with_parent_records_the_spawning_pid():
    import pickle

    f = pickle.loads(pickle.dumps(pipeline_mod.ExitWithParent(interval_s=0.25)))
    assert (f.parent_pid, f.interval_s) == (os.getpid(), 0.25)
    assert pipeline_mod._pid_running(os.getpid())
    # A zombie (dead, not yet reaped: what a SIGKILLed parent is until its parent waits) is not running.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while _state(child.pid) not in ("Z", None) and time.time() < deadline:
        time.sleep(0.05)
    assert not pipeline_mod._pid_running(child.pid)
    child.wait()
    assert not pipeline_mod._pid_running(child.pid)


def _state(pid):
    """The /proc state letter of `pid`, or None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


_WORKER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time

    def descendants(root):
        # /proc scan by PPid: works without CONFIG_PROC_CHILDREN and without psutil.
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat", "rb") as f:
                        parent[int(d)] = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            kids = [c for c, pp in parent.items() if pp == p]
            out += kids
            todo += kids
        return out

    if __name__ == "__main__":  # grain spawns its workers: they re-import this file
        from mxdna_jax.data import PretrainData, PretrainDataConfig
        cfg = PretrainDataConfig(window=62, global_batch_size=4, num_workers=2, cache_dir=sys.argv[1])
        it = iter(PretrainData(cfg).dataset())
        for _ in range(3):
            next(it)
        kids = descendants(os.getpid())
        cmd = {k: open(f"/proc/{k}/cmdline", "rb").read().replace(b"\\0", b" ").decode() for k in kids}
        print(json.dumps(cmd), flush=True)
        time.sleep(300)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_exit_when_parent_is_sigkilled(tmp_path):
    script = tmp_path / "run_workers.py"
    script.write_text(_WORKER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                                stderr=err, env=env, cwd=tmp_path)
    workers = []
    try:
        line = proc.stdout.readline()
        assert line, (tmp_path / "stderr.txt").read_text()[-3000:]
        cmd = {int(k): v for k, v in json.loads(line).items()}
        workers = [k for k, v in cmd.items() if "spawn_main" in v]
        assert len(workers) == 2, cmd
        proc.send_signal(signal.SIGKILL)  # no atexit, no finalizers: only the workers themselves can notice
        deadline = time.time() + 15
        # The killed parent stays a zombie (not reaped) meanwhile: the workers must not rely on its reaping.
        while time.time() < deadline and any(_state(k) not in (None, "Z", "X") for k in cmd):
            time.sleep(0.2)
        alive = {k: cmd[k] for k in cmd if _state(k) not in (None, "Z", "X")}
        # All gone: the workers, and then multiprocessing's resource tracker (it frees the workers'
        # shared memory once the last of them has exited).
        assert not alive, alive
    finally:
        proc.kill()
        proc.wait()
        for k in workers:  # never leave ~220 MB processes behind, even when the assertion failed
            if _state(k) not in (None, "Z", "X"):
                os.kill(k, signal.SIGKILL)
