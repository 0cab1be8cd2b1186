"""Labelled sequence datasets for fine-tuning and probing.

    task = load_task("GUE/prom/prom_300_tata")          # csv | folders | fasta, detected
    task = task.subsample("train", 10_000, seed=0)       # stratified, recorded in provenance
    print(task.describe())
    enc = encode_split(task.train, max_length=512)       # UserError if a row does not fit
    for batch in enc.batches(32, shuffle=True, seed=0, epoch=e, drop_remainder=True): ...

Layouts and carving: `loaders`; rows, labels, provenance: `labelled`; batch keys: `batching`.
"""

from mxdna_jax.tasks.batching import (
    BUCKET_MULTIPLE,
    TRUNCATE_MODES,
    EncodedSplit,
    batches,
    bucket_lengths,
    encode_split,
)
from mxdna_jax.tasks.labelled import SPLITS, LabelledTask, Split, allocate, carve, map_labels, subsample
from mxdna_jax.tasks.loaders import (
    LAYOUTS,
    detect_layouts,
    load_csv_task,
    load_fasta_task,
    load_folder_task,
    load_task,
    read_class_folders,
    read_fasta_classes,
    read_table,
)

__all__ = [
    "BUCKET_MULTIPLE", "LAYOUTS", "SPLITS", "TRUNCATE_MODES", "EncodedSplit", "LabelledTask", "Split",
    "allocate", "batches", "bucket_lengths", "carve", "detect_layouts", "encode_split", "load_csv_task",
    "load_fasta_task", "load_folder_task", "load_task", "map_labels", "read_class_folders",
    "read_fasta_classes", "read_table", "subsample",
]
