"""Data layer: FASTA genomes as cached id arrays, DNA barcodes, masked-LM corruption, Grain pipelines."""

from mxdna_jax.data.barcodes import (
    BarcodeSplit,
    Barcodes,
    default_barcode_paths,
    load_barcodes,
    split_barcodes,
)
from mxdna_jax.data.fasta import (
    FastaNotFoundError,
    Genome,
    default_cache_dir,
    load_fasta_ids,
    open_genome,
    parse_fasta,
    unigram_entropy,
)
from mxdna_jax.data.masking import mask_tokens
from mxdna_jax.data.pipeline import (
    PretrainData,
    PretrainDataConfig,
    WindowSampler,
    default_corpus_path,
    default_corpus_paths,
    element_rng,
    fasta_eval_batches,
    process_element_indices,
    split_segments,
)

__all__ = [
    "BarcodeSplit",
    "Barcodes",
    "FastaNotFoundError",
    "Genome",
    "PretrainData",
    "PretrainDataConfig",
    "WindowSampler",
    "default_barcode_paths",
    "default_cache_dir",
    "default_corpus_path",
    "default_corpus_paths",
    "element_rng",
    "fasta_eval_batches",
    "load_barcodes",
    "load_fasta_ids",
    "mask_tokens",
    "open_genome",
    "parse_fasta",
    "process_element_indices",
    "split_barcodes",
    "split_segments",
    "unigram_entropy",
]
