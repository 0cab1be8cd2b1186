"""BarcodeMAE on DNA barcodes: the masked autoencoder (or, for comparison, MxDNA's MLM) pretrained
on the embedded COI barcodes (seen-train species of the species-disjoint split).

    --config=configs/barcode_mae.py                 k-mer tokenizer, MAE, CPU size (the default)
    --config=configs/barcode_mae.py:learnt          MxDNA's learnt units, MAE
    --config=configs/barcode_mae.py:kmer,mlm        the same encoder trained with MxDNA's MLM
    --config=configs/barcode_mae.py:kmer,mae,paper  BarcodeMAE's sizes (d=768, 12 heads, 6 + 6 layers)

Argument: TOKENIZER[,OBJECTIVE][,SIZE] with TOKENIZER kmer | learnt, OBJECTIVE mae | mlm, SIZE cpu | paper.

The BarcodeMAE setting (Safari et al., 2025; bioscan-ml/BarcodeMAE): non-overlapping 6-mers from a
random start offset 0-5 in training (data.barcode_max_offset; 0 in evaluation), sequences cut or
padded to 660 nt (110 tokens), 50% of the tokens masked and dropped from the encoder, loss on
the masked tokens only, predicting each masked token's k-mer id among the 4,096 k-mers + [UNK]
(model.mae_target='kmer'), AdamW with warmup + cosine decay (our schedule; BarcodeMAE uses a
one-cycle schedule of the same shape). Differences from it: a token is embedded from its
nucleotides by the unit body (conv expert + deformable assembly, tokenizers/units.py) rather
than looked up in a 4,096-row table, so the same backbone also runs the learnt tokenization.

Equal compute for MLM vs MAE: the same encoder (nucleotide + token layers), steps and batch.
`learnt` spends one of the encoder's layers at nucleotide resolution (the router needs context)
and reconstructs nucleotides (mae_target='nucleotides'), since learnt units have no fixed vocabulary.
"""

import ml_collections

try:
    from configs import base
except ImportError:  # loaded by file path (config_flags) with the repo root not on sys.path
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location("_mxdna_configs_base", pathlib.Path(__file__).with_name("base.py"))
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)

TOKENIZERS = ("kmer", "learnt")
OBJECTIVES = ("mae", "mlm")
SIZES = {
    # encoder layers = nucleotide + token layers (4 / 6 in all); decoder layers for MAE
    "cpu": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, layers=4, decoder=2,
                batch=32, steps=600, lr=1e-3, warmup=60),
    "paper": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, layers=6, decoder=6,
                  batch=128, steps=50_000, lr=1e-4, warmup=2_500),
}
WINDOW = 660  # nucleotides: 110 6-mers


def get_config(arg: str = "kmer") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    tokenizer = parts[0] if parts else "kmer"
    objective = parts[1] if len(parts) > 1 else "mae"
    size = parts[2] if len(parts) > 2 else "cpu"
    if tokenizer not in TOKENIZERS or objective not in OBJECTIVES or size not in SIZES or len(parts) > 3:
        raise ValueError(f"barcode_mae config must be TOKENIZER[,OBJECTIVE][,SIZE] with TOKENIZER one of "
                         f"{TOKENIZERS}, OBJECTIVE one of {OBJECTIVES}, SIZE one of {tuple(SIZES)} "
                         f"(--config=configs/barcode_mae.py:learnt,mlm), got {arg!r}")
    s = SIZES[size]
    nucleotide_layers = 1 if tokenizer == "learnt" else 0
    c = base.build(base.model_section(
        hidden_size=s["hidden_size"], num_attention_heads=s["num_attention_heads"],
        intermediate_size=s["intermediate_size"], num_nucleotide_layers=nucleotide_layers,
        num_token_layers=s["layers"] - nucleotide_layers, max_position_embeddings=1024,
        tokenizer=tokenizer, kmer_size=6, jitter=tokenizer == "learnt",
        # 6-mers: 112 token rows of 662; learnt units: the default half, grown on overflow
        token_capacity_fraction=0.2 if tokenizer == "kmer" else 0.5,
        mae_decoder_layers=s["decoder"], mae_target="kmer" if tokenizer == "kmer" else "nucleotides"))
    c.objective = objective
    c.data.update(corpus="barcodes", window=WINDOW, global_batch_size=s["batch"], num_workers=0,
                  barcode_max_offset=5)
    c.mae.update(mask_ratio=0.5, span=6)
    c.train.update(steps=s["steps"], lr=s["lr"], warmup_steps=s["warmup"], weight_decay=0.05,
                   log_every=25 if size == "cpu" else 100, eval_every=s["steps"] // 4 if size == "cpu" else 2_000,
                   eval_batches=8)
    c.checkpoint.update(every_steps=s["steps"] // 2 if size == "cpu" else 5_000, keep=2)
    c.lock()
    return c
