"""CPU smoke-test size: d=64, 4 heads, FFN 128, 2 nucleotide + 2 token layers; runs in seconds."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.build(base.model_section(
        hidden_size=64, num_attention_heads=4, intermediate_size=128,
        num_nucleotide_layers=2, num_token_layers=2, max_position_embeddings=512))
    c.data.update(window=126, batch_size=16, num_workers=0, val_fraction=0.05)
    c.train.update(steps=200, lr=1e-3, warmup_steps=20, log_every=10, eval_every=100, eval_batches=4)
    c.checkpoint.update(every_steps=100, keep=2)
    c.lock()
    return c
