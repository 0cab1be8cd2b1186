"""The paper's tokenizer comparison (Table 3): the same backbone behind each tokenizer.

    --config=configs/baselines.py:mxdna          the learnt tokenization (MxDNA)
    --config=configs/baselines.py:single         single nucleotides (a plain transformer on nucleotides)
    --config=configs/baselines.py:kmer           non-overlapping 6-mers
    --config=configs/baselines.py:kmer_overlap   overlapping 6-mers (DNABERT-1), one token per nucleotide
    --config=configs/baselines.py:bpe            BPE of 4096 tokens trained on the pretraining corpus (DNABERT-2)

Append ',base' for the ~100M configs/base.py backbone (`...:bpe,base`); the default is
configs/tiny.py. The fixed tokenizers cut the sequence into units that the learnt layer's own
unit body embeds (conv expert of the unit's length + deformable assembly; tokenizers/__init__.py),
so only the segmentation differs; `single` has no unit body (identity).

bpe: the model reads the segmentation from batch['units'], which the data pipeline adds with
tokenizers/bpe.BpeSegmenter(<workdir>/bpe_tokenizer.json) (trained by tokenizers/bpe.ensure_tokenizer
on the pretraining corpus before the first step with `model.bpe_vocab_size` tokens, or copied
from `model.bpe_path` when that names a file).
"""

import ml_collections

try:
    from configs import base, tiny
except ImportError:  # loaded by file path (config_flags) with the repo root not on sys.path
    import importlib.util
    import pathlib

    def _load(name):
        spec = importlib.util.spec_from_file_location(f"_mxdna_configs_{name}",
                                                      pathlib.Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    base, tiny = _load("base"), _load("tiny")

VARIANTS = {
    "mxdna": dict(tokenizer="learnt"),
    "single": dict(tokenizer="single", experts=False, deformable=False, jitter=False),
    "kmer": dict(tokenizer="kmer", kmer_size=6, jitter=False),
    "kmer_overlap": dict(tokenizer="kmer_overlap", kmer_size=6, jitter=False),
    "bpe": dict(tokenizer="bpe", bpe_vocab_size=4096, jitter=False),
}
SIZES = ("tiny", "base")


def get_config(arg: str = "mxdna") -> ml_collections.ConfigDict:
    variant, _, size = arg.partition(",")
    size = size or "tiny"
    if variant not in VARIANTS or size not in SIZES:
        raise ValueError(f"baseline must be VARIANT[,SIZE] with VARIANT one of {', '.join(VARIANTS)} and SIZE "
                         f"one of {', '.join(SIZES)} (--config=configs/baselines.py:bpe,base), got {arg!r}")
    c = (tiny if size == "tiny" else base).get_config()
    return base.with_model(c, **VARIANTS[variant])
