"""CPU smoke-test size: d=64, 4 heads, FFN 128, 2 nucleotide + 2 token layers; runs in seconds."""

import ml_collections

try:
    from configs import base
except ImportError:  # loaded by file path (config_flags) with the repo root not on sys.path
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location("_mxdna_configs_base", pathlib.Path(__file__).with_name("base.py"))
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)


def get_config() -> ml_collections.ConfigDict:
    c = base.build(base.model_section(
        hidden_size=64, num_attention_heads=4, intermediate_size=128,
        num_nucleotide_layers=2, num_token_layers=2, max_position_embeddings=512))
    c.data.update(window=126, global_batch_size=16, num_workers=0, val_fraction=0.05)
    c.train.update(steps=200, lr=1e-3, warmup_steps=20, log_every=10, eval_every=100, eval_batches=4)
    c.checkpoint.update(every_steps=100, keep=2)
    c.lock()
    return c
