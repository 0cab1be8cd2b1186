"""The paper's ~100M MxDNA: d=512, 16 heads, FFN 2048, 4 nucleotide + 16 token layers.

`get_config()` returns a locked ConfigDict: `--config.train.stesp=5` fails instead of being
ignored. The `model` section has exactly the fields of `ModelConfig` (built from the dataclass,
so the two cannot drift).

Optimisation numbers below are a conventional BERT-base-like recipe, not yet checked against
the MxDNA paper's appendix.
"""

import dataclasses

import ml_collections

from mxdna_jax.config import ModelConfig
from mxdna_jax.data.pipeline import PretrainDataConfig


def model_section(**overrides) -> ml_collections.ConfigDict:
    m = ModelConfig(**overrides)
    d = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    d["expert_kernel_sizes"] = tuple(d["expert_kernel_sizes"])
    return ml_collections.ConfigDict(d)


def with_model(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """`config`, locked, with its model section rebuilt through ModelConfig with `fields` changed
    (so an ablation or baseline variant is validated like any model config)."""
    model = {**config.model.to_dict(), **fields}
    config.unlock()
    config.model = model_section(**model)
    config.lock()
    return config


def data_section(**overrides) -> ml_collections.ConfigDict:
    """The data section: exactly the fields of PretrainDataConfig.

    `fasta` and `barcodes` are one string here ('' = the embedded default corpus / barcodes;
    several files comma-separated) because tuples cannot be overridden from the command line.
    `corpus` picks one: 'genome' (FASTA windows) or 'barcodes' (one DNA barcode per example from
    the seen-train species of a species-disjoint split, written to WORKDIR/barcode_split.tsv;
    `barcode_seed`, `barcode_unseen_fraction`, `barcode_test_fraction`, `barcode_max_offset`).
    """
    paths = ("fasta", "barcodes")
    d = dataclasses.asdict(PretrainDataConfig(**{k: v for k, v in overrides.items() if k not in paths}))
    for k in paths:
        d[k] = overrides.get(k, "")
    d["cache_dir"] = d["cache_dir"] or ""
    return ml_collections.ConfigDict(d)


def build(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The unlocked base config around a `model` section (tiny.py edits it before locking)."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.objective = "mlm"              # what the step optimises: a key of mxdna_jax.objectives.OBJECTIVES
    c.init_from = ""                 # warm start: a train.py workdir, a step dir, a params dir or an
                                     # official .safetensors ('' = fresh init); ignored when resuming

    c.data = data_section(
        window=510,                   # nucleotides per example; +[CLS]/[SEP] = 512 positions
        global_batch_size=256,        # across all processes
        num_workers=8,
        val_fraction=0.01,
    )

    c.train = ml_collections.ConfigDict(dict(
        steps=100_000,
        lr=1e-4,
        warmup_steps=5_000,
        min_lr_ratio=0.1,
        weight_decay=0.01,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        grad_clip=1.0,
        grad_accum_steps=1,           # micro-batches per optimizer step (batch_size % this == 0)
        seed=0,
        log_every=50,
        eval_every=2_000,
        eval_batches=20,
        capacity_growth=1.5,          # compact-mode token capacity multiplier after an overflow
        # the capacity follows the token counts (mxdna_jax.capacity): the smallest rung of a ladder
        # of x(1 + bucket_step) steps holding (1 + margin) x the recent largest count; it shrinks
        # after `patience` steps that would fit a smaller rung; no move that compiles a new step
        # with fewer than `min_remaining` steps left. False: fixed, grown on overflow only
        capacity_adaptive=True,
        capacity_margin=0.05,
        capacity_patience=10,
        capacity_bucket_step=0.0625,
        capacity_min_remaining=100,
    ))

    # Not `async`: a Python keyword cannot be parsed by config_flags (--config.checkpoint.async=...).
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=2_000,
        keep=3,
        async_save=True,
        checksums=True,               # per-file sha256 manifest, verified on restore
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1 = all remaining devices

    # objective='mae' (BarcodeMAE): nucleotide spans of `span` nt (= the k-mer size with
    # tokenizer='kmer', so a span is a token) are masked, exactly round(mask_ratio x spans) per
    # sequence; the encoder processes (1 - mask_ratio + keep_margin) x the token rows at most.
    c.mae = ml_collections.ConfigDict(dict(mask_ratio=0.5, span=6, keep_margin=0.1))

    # eval.py finetune: the classifier's schedule (optimizer settings otherwise from `train`).
    c.finetune = ml_collections.ConfigDict(dict(
        epochs=3,
        batch_size=32,                # global; a multiple of the mesh's batch shards
        lr=1e-4,
        warmup_ratio=0.1,             # of all fine-tuning steps
        patience=2,                   # evaluations on dev without a better MCC before stopping
        eval_every=0,                 # steps between dev evaluations; 0 = once per epoch
        max_length=0,                 # padded tokens incl. [CLS]/[SEP]; 0 = model.max_position_embeddings
        truncate="",                  # '' = a longer sequence is an error; 'right' | 'left' | 'center'
        dev_fraction=0.0,             # > 0: carve a stratified dev split from train when a task has none
        max_train=0,                  # > 0: stratified subsample of the training split (recorded)
    ))
    return c


def get_config() -> ml_collections.ConfigDict:
    c = build(model_section())
    c.lock()
    return c
