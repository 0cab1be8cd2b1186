"""The paper's component ablation of the learnt tokenization, at tiny (CPU smoke) size.

    --config=configs/ablation.py:single      single-nucleotide baseline (plain transformer on nucleotides)
    --config=configs/ablation.py:experts     + convolution experts (learnt units, token = expert-embedded centre)
    --config=configs/ablation.py:deformable  + deformable convolution (token = deformable assembly)
    --config=configs/ablation.py:full        + router jitter: the full MxDNA tokenization

Everything but the tokenizer switches is configs/tiny.py; the `model` section has exactly the
fields of ModelConfig (configs/base.model_section).
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
    "single": dict(tokenizer="single", experts=False, deformable=False, jitter=False),
    "experts": dict(tokenizer="learnt", experts=True, deformable=False, jitter=False),
    "deformable": dict(tokenizer="learnt", experts=True, deformable=True, jitter=False),
    "full": dict(tokenizer="learnt", experts=True, deformable=True, jitter=True),
}


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"ablation variant must be one of {', '.join(VARIANTS)} "
                         f"(--config=configs/ablation.py:VARIANT), got {variant!r}")
    c = tiny.get_config()
    return base.with_model(c, **VARIANTS[variant])
