"""Grain pipelines of masked-LM windows drawn from a Genome, or of DNA barcodes
(`corpus='barcodes'`: one barcode per example, see data/barcodes.py).

Design: element g of the (conceptually infinite) global stream is a pure function of
(seed, stream, g): a counter-based Philox generator picks the window (or the barcode and its
start offset), the strand and the mask.
So any element can be recomputed, shuffling is implicit, and a restart or a change of worker
count or of process count cannot change the data. Global batch s holds elements
s*GB .. s*GB+GB-1; process p of P gets the contiguous slice j in [p*GB/P, (p+1)*GB/P).
Batching happens on the MapDataset (before `to_iter_dataset`/`mp_prefetch`), so workers
split whole batches and never reorder elements between batches.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import threading
import time

import grain
import numpy as np

from mxdna_jax import vocab
from mxdna_jax.data.fasta import Genome, open_genome

TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 0, 1, 2
CORPORA = ("genome", "barcodes")
_ENDLESS_STEPS = 2**40  # "infinite" training stream; MapDataset needs a length


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
    fasta: tuple[str, ...] = ()  # FASTA(.gz) paths; empty: the embedded yeast corpus
    window: int = 510  # nucleotides per window; model length is window + 2 ([CLS] ... [SEP])
    global_batch_size: int = 32
    seed: int = 0
    rc_prob: float = 0.5  # probability of taking the reverse-complement strand
    max_n_frac: float = 0.1  # windows with more [UNK] (N, IUPAC) than this are re-drawn
    max_tries: int = 100  # re-draws before giving up on a corpus that is (almost) all N
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    val_fraction: float = 0.02  # held-out tail of the concatenated genome
    min_val_windows: int = 8  # ... but at least this many windows' worth of sequence
    val_seed: int = 0  # fixed, independent of `seed`, so validation losses compare across runs
    num_workers: int = 0  # grain mp_prefetch processes (0: in-process)
    read_threads: int = 1  # to_iter_dataset threads (elements are small and GIL-bound)
    prefetch_batches: int = 4
    drop_gaps: bool = False
    cache_dir: str | None = None
    # corpus='barcodes': one DNA barcode per example from the seen-train split of
    # data/barcodes.py (validation: seen-test); window, masking and seeds as above; rc_prob,
    # max_n_frac, val_fraction and min_val_windows do not apply.
    corpus: str = "genome"  # 'genome' (FASTA windows) | 'barcodes'
    barcodes: tuple[str, ...] = ()  # barcode TSV(.gz) paths; empty: the embedded BarcodeBERT barcodes
    barcode_seed: int = 0  # the species-disjoint split's seed
    barcode_unseen_fraction: float = 0.2  # of species, held out of pretraining (1-NN genus queries)
    barcode_test_fraction: float = 0.2  # of each seen species' barcodes (linear-probe test, validation)
    barcode_max_offset: int = 5  # training drops a random 0..this many nt from the front

    @property
    def seq_length(self) -> int:
        """Model sequence length: the window plus [CLS] and [SEP]."""
        return self.window + 2

    def __post_init__(self):
        for name in ("fasta", "barcodes"):
            paths = getattr(self, name)
            paths = (paths,) if isinstance(paths, (str, os.PathLike)) else paths
            object.__setattr__(self, name, tuple(str(p) for p in paths if str(p)))
        self._validate()

    def _validate(self):
        """One-line ValueErrors naming the field as in the config (`data.<field>`) and its value.

        Checked here, not where used: the masking fractions, for one, are only used inside grain
        workers, where a bad value would surface as a worker traceback after compiling.
        """
        for name, lo in (("window", 1), ("global_batch_size", 1), ("max_tries", 1), ("read_threads", 1),
                         ("prefetch_batches", 1), ("num_workers", 0), ("min_val_windows", 0)):
            _check_int(name, getattr(self, name), lo)
        for name in ("seed", "val_seed", "barcode_seed"):
            _check_int(name, getattr(self, name), None)
        _check_int("barcode_max_offset", self.barcode_max_offset, 0)
        if self.corpus not in CORPORA:
            raise ValueError(f"data.corpus must be one of {', '.join(map(repr, CORPORA))}, got {self.corpus!r}")
        for name in ("barcode_unseen_fraction", "barcode_test_fraction"):
            _check_fraction(name, getattr(self, name), "[0, 1)")
        for name in ("rc_prob", "max_n_frac", "val_fraction", "mask_token_frac", "random_token_frac"):
            _check_fraction(name, getattr(self, name), "[0, 1]")
        _check_fraction("mask_prob", self.mask_prob, "(0, 1]")
        if self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError(
                f"data.mask_token_frac + data.random_token_frac must be <= 1, got "
                f"{self.mask_token_frac} + {self.random_token_frac}"
            )


def _check_int(name: str, value, lo: int | None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"data.{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"data.{name} must be {'> 0' if lo == 1 else f'>= {lo}'}, got {value}")


def _check_fraction(name: str, value, interval: str):
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
    if ok:  # the comparisons also reject NaN
        ok = {"(0, 1]": 0 < value <= 1, "[0, 1)": 0 <= value < 1}.get(interval, 0 <= value <= 1)
    if not ok:
        raise ValueError(f"data.{name} must be a number in {interval}, got {value!r}")


def default_corpus_paths() -> tuple[str, ...]:
    """The embedded yeast chrI genomes (3 species, 0.7 Mb); see default_corpus/SOURCE.md."""
    root = importlib.resources.files("mxdna_jax.data") / "default_corpus"
    return tuple(sorted(str(p) for p in root.iterdir() if p.name.endswith(".fna.gz")))


def default_corpus_path() -> str:
    """The embedded S. cerevisiae S288C chromosome I (230 kb, one record)."""
    return next(p for p in default_corpus_paths() if "ScerR64" in p)


def element_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator for element `index`: Philox keyed by (seed, stream), counter = index.

    The index sits in the high 128 bits of the counter, so elements never share random numbers.
    """
    key = (int(stream) << 64) | (int(seed) % 2**64)
    return np.random.Generator(np.random.Philox(key=key, counter=int(index) << 128))


def process_element_indices(step: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Global element indices forming process `process_index`'s share of global batch `step`."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
    b = global_batch_size // process_count
    return step * global_batch_size + process_index * b + np.arange(b)


def split_segments(genome: Genome, window: int, val_fraction: float, min_val_windows: int):
    """(train, val, val_start): [start, end) pieces of records, in concatenated coordinates.

    The validation region is the tail [val_start, len(genome)); train pieces end at or before
    val_start, so no training window overlaps it. Pieces shorter than `window` are dropped.
    """
    total = len(genome)
    n_val = max(math.ceil(val_fraction * total), min_val_windows * window) if val_fraction > 0 else 0
    if n_val >= total:
        raise ValueError(
            f"validation region ({n_val} nt) would cover the whole genome ({total} nt); "
            "lower val_fraction, min_val_windows or window"
        )
    val_start = total - n_val
    ends = genome.starts + genome.lengths
    train = [(s, min(e, val_start)) for s, e in zip(genome.starts, ends) if min(e, val_start) - s >= window]
    val = [(max(s, val_start), e) for s, e in zip(genome.starts, ends) if e - max(s, val_start) >= window]
    return train, val, val_start


class WindowSampler:
    """Draws `window`-nt pieces from `segments`, uniformly over start positions (so records
    are weighted by length), re-drawing windows with more than `max_n_frac` [UNK]."""

    def __init__(self, genome, segments, window, *, max_n_frac=0.1, max_tries=100, what="corpus"):
        if not segments:
            raise ValueError(f"{what}: no record (piece) of at least window={window} nt in {genome.paths}")
        self.genome, self.window, self.max_tries, self.what = genome, window, max_tries, what
        self.segments = [(int(s), int(e)) for s, e in segments]
        self.max_n = int(math.floor(max_n_frac * window))
        self.seg_start = np.asarray([s for s, _ in segments], dtype=np.int64)
        self.cum = np.cumsum([e - s - window + 1 for s, e in segments]).astype(np.int64)
        # Cheap upfront check (one pass) so an all-N corpus fails here, not after max_tries per element.
        best = max(np.count_nonzero(genome.window(s, e - s) != vocab.UNK) for s, e in segments)
        if best < window - self.max_n:
            raise ValueError(
                f"{what}: no window of {window} nt with at most {max_n_frac:.0%} N exists "
                f"(the best piece has {best} non-N nt); is the corpus all N?"
            )

    def sample(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(concatenated start, ids copy) of an accepted window."""
        for _ in range(self.max_tries):
            u = int(rng.integers(self.cum[-1]))
            k = int(np.searchsorted(self.cum, u, side="right"))
            start = int(self.seg_start[k] + u - (self.cum[k - 1] if k else 0))
            win = self.genome.window(start, self.window)
            if np.count_nonzero(win == vocab.UNK) <= self.max_n:
                return start, np.array(win, dtype=np.int32)
        raise ValueError(
            f"{self.what}: {self.max_tries} random windows in a row had more than {self.max_n}/{self.window} N; "
            "the corpus is almost all N (raise max_n_frac or use another corpus)"
        )


class MakeExample:
    """Global element index -> one unbatched example dict (picklable, for grain workers): a
    window, its strand, then the objective's transform (MLM masking by default)."""

    def __init__(self, sampler: WindowSampler, cfg: PretrainDataConfig, seed: int, stream: int, objective=None):
        self.sampler, self.cfg, self.seed, self.stream = sampler, cfg, seed, stream
        self.objective = objective if objective is not None else _default_objective(cfg)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = element_rng(self.seed, self.stream, index)
        _, win = self.sampler.sample(rng)
        if rng.random() < self.cfg.rc_prob:
            win = vocab.reverse_complement_ids(win)
        tokens = np.concatenate([[vocab.CLS], win, [vocab.SEP]]).astype(np.int32)
        return self.objective.example(tokens, rng)


def _default_objective(cfg: PretrainDataConfig):
    from mxdna_jax.objectives.mlm import MLM

    return MLM(cfg.mask_prob, cfg.mask_token_frac, cfg.random_token_frac)


class _LocalToGlobal:
    """Process-local element k -> global element index (see process_element_indices)."""

    def __init__(self, global_batch_size: int, process_index: int, process_count: int):
        self.gb, self.b, self.p = global_batch_size, global_batch_size // process_count, process_index

    def __call__(self, k: int) -> int:
        return (k // self.b) * self.gb + self.p * self.b + k % self.b


def _ensure_absl_flags_parsed():
    """Grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class ExitWithParent:
    """`worker_init_fn` for grain's `mp_prefetch`: the worker exits within ~`interval_s` seconds
    of the death of the process that started it, even a SIGKILL that runs no cleanup (without
    this, each orphaned worker keeps ~220 MB and its shared memory until killed by hand).

    How: a daemon thread in the worker polls every `interval_s` and `os._exit`s once the parent
    is gone. Why not `prctl(PR_SET_PDEATHSIG)`: it is Linux only, and it fires when the parent
    *thread* that spawned the worker exits; grain 0.2.18 starts its workers (spawn context, so
    direct children) from the thread pool of InterleaveIterDataset's make-iterator prefetch, so
    healthy workers would die whenever that pool's threads come and go.

    "Parent gone" is either: our parent pid changed (we were reparented, which the kernel does at
    the parent's exit, zombie or not), or the spawning pid no longer runs (covers a death before
    the thread started, and an intermediate process such as a forkserver).
    The spawning pid is read when this object is pickled (grain cloudpickles the init fn in the
    process that starts the workers), not when the dataset is built, possibly elsewhere.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.parent_pid = os.getpid()

    def __getstate__(self):
        return {"interval_s": self.interval_s, "parent_pid": os.getpid()}

    def __call__(self, worker_index: int = 0, worker_count: int = 1):
        args = (self.parent_pid, os.getppid(), self.interval_s)
        threading.Thread(target=_exit_when_parent_gone, args=args, daemon=True, name="exit-with-parent").start()


def _exit_when_parent_gone(parent_pid: int, ppid_at_start: int, interval_s: float):
    while os.getppid() == ppid_at_start and _pid_running(parent_pid):
        time.sleep(interval_s)
    os._exit(1)  # no cleanup: the parent that would read our queues is gone


def _pid_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a SIGKILLed parent stays one until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # field 3; the name may hold spaces
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): existence is all we can tell


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class PretrainData:
    """Opens the corpus once; builds the training stream and the validation batches.

    corpus='barcodes': `split` (a data.barcodes.BarcodeSplit; pretrain.run passes the workdir's)
    or, by default, the split of cfg.barcodes made with cfg.barcode_* (not written anywhere).
    """

    def __init__(self, cfg: PretrainDataConfig, *, process_index: int = 0, process_count: int = 1, genome=None,
                 objective=None, split=None):
        if cfg.global_batch_size % process_count:
            raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.objective = objective if objective is not None else _default_objective(cfg)
        self.local_batch_size = cfg.global_batch_size // process_count
        if cfg.corpus == "barcodes":
            self._init_barcodes(split)
            return
        self.genome = open_genome(genome if genome is not None else (cfg.fasta or default_corpus_paths()),
                                  drop_gaps=cfg.drop_gaps, cache_dir=cfg.cache_dir)
        train, val, self.val_start = split_segments(self.genome, cfg.window, cfg.val_fraction, cfg.min_val_windows)
        kw = dict(max_n_frac=cfg.max_n_frac, max_tries=cfg.max_tries)
        self.train_sampler = WindowSampler(self.genome, train, cfg.window, what="training region", **kw)
        self.val_sampler = WindowSampler(self.genome, val, cfg.window, what="validation region", **kw) if val else None
        if cfg.val_fraction > 0 and self.val_sampler is None:
            raise ValueError(f"validation region holds no record piece of {cfg.window} nt; raise min_val_windows")
        self.split = None

    def _init_barcodes(self, split):
        from mxdna_jax.data import barcodes as bc

        cfg = self.cfg
        if split is None:
            split = bc.split_barcodes(bc.load_barcodes(cfg.barcodes or None), cfg.barcode_seed,
                                      cfg.barcode_unseen_fraction, cfg.barcode_test_fraction)
        self.split, self.genome, self.val_start = split, None, None
        self.train_sampler = bc.BarcodeSampler(split.subset("train"), cfg.window, max_offset=cfg.barcode_max_offset,
                                               what="seen-train barcodes")
        test = split.subset("test")
        self.val_sampler = bc.BarcodeSampler(test, cfg.window, order=np.random.default_rng(cfg.val_seed).permutation(
            len(test)), what="seen-test barcodes") if len(test) else None

    def _make(self, sampler, seed: int, stream: int):
        if self.cfg.corpus == "barcodes":
            from mxdna_jax.data.barcodes import MakeBarcodeExample

            return MakeBarcodeExample(sampler, seed, stream, self.objective)
        return MakeExample(sampler, self.cfg, seed, stream, self.objective)

    def dataset(self, *, start_step: int = 0, num_steps: int | None = None) -> grain.IterDataset:
        """This process's batches for steps start_step, start_step+1, ...

        `iter(...)` gives a grain iterator with get_state()/set_state(). Its state embeds the
        worker count; to resume with a different num_workers, pass start_step instead (the
        data of a step does not depend on how it is produced).
        """
        cfg, b = self.cfg, self.local_batch_size
        n = _ENDLESS_STEPS if num_steps is None else num_steps
        ds = (
            grain.MapDataset.range(start_step * b, (start_step + n) * b)
            .map(_LocalToGlobal(cfg.global_batch_size, self.process_index, self.process_count))
            .map(self._make(self.train_sampler, cfg.seed, TRAIN_STREAM))
            .batch(b, drop_remainder=True)
        )
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.prefetch_batches))
        if cfg.num_workers > 0:
            _ensure_absl_flags_parsed()
            opts = grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch_batches
            )
            it = it.mp_prefetch(opts, worker_init_fn=ExitWithParent())
        return it

    def validation_batches(self, n_batches: int, *, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
        """A fixed list of this process's validation batches (seeded by cfg.val_seed only)."""
        if self.val_sampler is None:
            raise ValueError("no seen-test barcodes to validate on: data.barcode_test_fraction is 0"
                             if self.cfg.corpus == "barcodes" else "no validation region: val_fraction is 0")
        make = self._make(self.val_sampler, self.cfg.val_seed, VAL_STREAM)
        return _fixed_batches(make, n_batches, batch_size or self.cfg.global_batch_size, self.process_index,
                              self.process_count)


def _fixed_batches(make, n_batches, global_batch_size, process_index=0, process_count=1):
    return [
        _stack([make(int(g)) for g in process_element_indices(s, global_batch_size, process_index, process_count)])
        for s in range(n_batches)
    ]


def fasta_eval_batches(
    fasta, *, window: int, batch_size: int, n_batches: int, seed: int = 0, rc_prob: float = 0.0, **cfg_overrides
) -> list[dict[str, np.ndarray]]:
    """Deterministic masked-LM batches from windows of any FASTA (the whole file, no split).

    Same windows and masks for a given (file, window, batch_size, seed), whatever the model.
    The forward strand is used by default (rc_prob=0) so results refer to the file as written.
    """
    for name, value in (("window", window), ("batch_size", batch_size), ("n_batches", n_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer > 0, got {value!r}")  # eval.py's flag names
    genome = open_genome(
        fasta, drop_gaps=cfg_overrides.get("drop_gaps", False), cache_dir=cfg_overrides.get("cache_dir")
    )
    cfg = PretrainDataConfig(
        fasta=genome.paths, window=window, global_batch_size=batch_size, seed=seed, rc_prob=rc_prob,
        val_fraction=0.0, **cfg_overrides,
    )
    train, _, _ = split_segments(genome, window, 0.0, 0)
    sampler = WindowSampler(genome, train, window, max_n_frac=cfg.max_n_frac, max_tries=cfg.max_tries,
                            what=", ".join(genome.paths))
    return _fixed_batches(MakeExample(sampler, cfg, seed, EVAL_STREAM), n_batches, batch_size)
