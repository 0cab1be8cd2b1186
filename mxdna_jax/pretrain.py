"""Pretraining glue: a config -> (model, objective) via `build`, FASTA windows or DNA barcodes,
`trainer.run_training`.

train.py is the command line; this module is importable so tests and notebooks can run the same
thing in-process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os

import jax

from mxdna_jax import build, cli, validate, workdir as workdir_lib
from mxdna_jax.cli import UserError
from mxdna_jax.data.pipeline import PretrainData, PretrainDataConfig

log = logging.getLogger(__name__)

PRETRAINING_OBJECTIVES = ("mlm", "mae")  # the objectives that need no labels


def data_config(section) -> PretrainDataConfig:
    d = dict(section)
    for key in ("fasta", "barcodes"):
        paths = d.pop(key, "") or ""
        # Resolved here, once: grain workers and Orbax must not depend on the current directory.
        d[key] = tuple(cli.abspath(p.strip()) for p in str(paths).split(",") if p.strip())
    d["cache_dir"] = cli.abspath(d.get("cache_dir")) or None
    names = {f.name for f in dataclasses.fields(PretrainDataConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown data config field(s): {unknown}")
    try:
        return PretrainDataConfig(**d)
    except (TypeError, ValueError) as e:
        raise UserError(cli.one_line(e)) from None


def check_paths(dc: PretrainDataConfig):
    for field, what, paths in (("fasta", "FASTA", dc.fasta), ("barcodes", "barcode TSV", dc.barcodes)):
        for p in paths:
            if not os.path.exists(p):
                raise UserError(f"{what} file not found: {p}")
            if os.path.isdir(p):
                raise UserError(f"data.{field} {p} is a directory, not a {what} file")


def barcode_split(dc: PretrainDataConfig, workdir: str):
    """corpus='barcodes': the run's species-disjoint split, WORKDIR/barcode_split.tsv when it
    exists (a resume: checked against the config and the barcodes), else a new one (not yet
    written: `write_split` inside the workdir lock)."""
    from mxdna_jax.data import barcodes as bc

    try:
        return bc.ensure_split(os.path.join(workdir, bc.SPLIT_FILENAME), bc.load_barcodes(dc.barcodes or None),
                               seed=dc.barcode_seed, unseen_fraction=dc.barcode_unseen_fraction,
                               test_fraction=dc.barcode_test_fraction, write=False)
    except ValueError as e:
        raise UserError(cli.one_line(e)) from None


def run(config, workdir: str, *, resume: bool = True, mesh=None, allow_config_change: bool = False,
        stop_signal=None):
    """Validate everything, lock the workdir, then train (see `trainer.run_training`).

    Every check that can fail on the user's input runs before the workdir is created or anything
    is compiled, and fails with a one-line UserError.
    """
    from mxdna_jax import trainer

    workdir = cli.abspath(workdir)
    if config.get("init_from"):  # resolved once, here (and recorded so in config.json)
        config = copy.deepcopy(config)
        with config.unlocked():
            config.init_from = cli.abspath(config.init_from)
    validate.check_training_config(config)
    mc = build.model_config(config)
    if str(config.get("objective", "mlm")) not in PRETRAINING_OBJECTIVES:
        raise UserError(f"objective={config.objective!r}: train.py pretrains on unlabelled sequence, which "
                        f"only the {' and '.join(map(repr, PRETRAINING_OBJECTIVES))} objectives can use")
    dc = data_config(config.data)
    check_paths(dc)
    L = dc.seq_length
    if L > mc.max_position_embeddings:
        raise UserError(f"data.window={dc.window} gives {L} positions with [CLS]/[SEP], more than "
                        f"model.max_position_embeddings={mc.max_position_embeddings}")
    if mesh is None:
        mesh = validate.check_mesh(config, jax.devices())
    else:
        validate.check_batch_fits_mesh(config, mesh)
    workdir_lib.check_writable(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise UserError(f"{ckpt_dir} already holds checkpoints and --noresume was given; "
                        f"use a new --workdir (nothing is overwritten)")
    split = barcode_split(dc, workdir) if dc.corpus == "barcodes" else None
    bpe_path = None
    if mc.tokenizer == "bpe":  # trained on this run's corpus and kept next to its checkpoints
        from mxdna_jax.data.pipeline import default_corpus_paths
        from mxdna_jax.tokenizers import bpe

        corpus = dc.fasta or default_corpus_paths()
        if split is not None:
            train = split.subset("train")
            corpus = [train.sequence(i) for i in range(len(train))]
        bpe_path = str(bpe.ensure_tokenizer(workdir, corpus, mc.bpe_vocab_size, source=mc.bpe_path or None))
    exp = build.build(config, bpe_path=bpe_path)
    try:  # opens (and caches) the corpus and validates it before any compile
        PretrainData(dc, objective=exp.objective, split=split)
    except (ValueError, OSError) as e:
        raise UserError(cli.one_line(e)) from None

    def train_iter(shard, num_shards, start_step, data_state):
        ds = PretrainData(dc, process_index=shard, process_count=num_shards, objective=exp.objective, split=split)
        it = iter(ds.dataset(start_step=0 if data_state else start_step))
        if data_state:
            it.set_state(data_state)  # the grain iterator's own checkpoint
        return it

    @functools.cache
    def val_batches(shard, num_shards):
        ds = PretrainData(dc, process_index=shard, process_count=num_shards, objective=exp.objective, split=split)
        return ds.validation_batches(int(config.train.eval_batches))

    with workdir_lib.locked(workdir):
        if split is not None and jax.process_index() == 0:
            from mxdna_jax.data.barcodes import write_split

            reused = os.path.exists(split.path)
            if not reused:
                write_split(split, split.path)  # before training: `eval.py probe` reads it
            log.info("%s %s %s", split.describe(), "from" if reused else "->", split.path)
        return trainer.run_training(
            config, workdir, loss_fn=exp.loss_fn, model_ctor=exp.model_ctor(),
            train_iter_factory=train_iter, eval_iter_factory=val_batches, policy=exp.capacity(L), mesh=mesh,
            allow_config_change=allow_config_change, stop_signal=stop_signal)
