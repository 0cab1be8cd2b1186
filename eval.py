"""Evaluate MxDNA checkpoints.

    python eval.py mlm --workdir=DIR --fasta=FILE [--checkpoint=STEP_DIR] [--batches=8] [--seed=0]

`mlm` prints and writes (DIR/eval_mlm.json, or --out) the masked-LM loss and accuracy of the
newest good checkpoint of a train.py run on deterministic windows of any FASTA.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir (config.json + checkpoints/)")
_CKPT = flags.DEFINE_string("checkpoint", None, "a specific step directory (default: newest good one)")
_FASTA = flags.DEFINE_string("fasta", None, "FASTA(.gz) to evaluate on")
_BATCHES = flags.DEFINE_integer("batches", 8, "number of batches")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "windows per batch")
_WINDOW = flags.DEFINE_integer("window", None, "nucleotides per window (default: the run's window)")
_SEED = flags.DEFINE_integer("seed", 0, "window and masking seed")
_OUT = flags.DEFINE_string("out", None, "output JSON (default: WORKDIR/eval_mlm.json)")


def eval_mlm() -> dict:
    import numpy as np
    from flax import nnx

    from mxdna_jax import params_io, train_lib
    from mxdna_jax.data.pipeline import fasta_eval_batches
    from mxdna_jax.objectives.mlm import mlm_loss_fn

    if not _WORKDIR.value or not _FASTA.value:
        raise app.UsageError("mlm needs --workdir and --fasta")
    if not os.path.exists(_FASTA.value):
        raise app.UsageError(f"FASTA file not found: {_FASTA.value}")
    model, step = params_io.load_from_workdir(_WORKDIR.value, step_dir=_CKPT.value)
    run_cfg = json.load(open(os.path.join(_WORKDIR.value, "config.json")))
    window = _WINDOW.value or int(run_cfg["data"]["window"])
    batches = fasta_eval_batches(_FASTA.value, window=window, batch_size=_BATCH_SIZE.value,
                                 n_batches=_BATCHES.value, seed=_SEED.value)
    L = window + 2
    capacity = model.cfg.token_capacity(L) if model.cfg.mode == "compact" else None

    @nnx.jit(static_argnames=("token_capacity",))
    def eval_step(model, batch, token_capacity):
        return mlm_loss_fn(model, batch, None, token_capacity=token_capacity)[1]

    # the training loop's evaluator: masked-count-weighted means, capacity re-run on overflow
    m, _ = train_lib.evaluate(eval_step, model, batches, capacity, max_capacity=L if capacity else None)
    weight = sum(float(np.sum(b["labels"] != -100)) for b in batches)
    result = {k: float(m[k]) for k in ("mlm_loss", "accuracy", "aux_loss")}
    result.update(step=step, fasta=os.path.abspath(_FASTA.value), window=window, windows=len(batches) * _BATCH_SIZE.value,
                  predicted_positions=int(weight), seed=_SEED.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, "eval_mlm.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"step {step}: mlm_loss {result['mlm_loss']:.4f} nats, accuracy {result['accuracy']:.4f} "
          f"on {result['windows']} windows of {window} nt ({int(weight)} masked positions) -> {out}")
    return result


def main(argv):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    commands = {"mlm": eval_mlm}
    if len(argv) != 2 or argv[1] not in commands:
        raise app.UsageError(f"usage: eval.py {{{','.join(commands)}}} [flags]")
    try:
        commands[argv[1]]()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
