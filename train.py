"""Pretrain MxDNA with masked language modelling.

    python train.py --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=500 ...]

Runs on one device, on a mesh of local devices, or on many hosts under jax.distributed
(--coordinator_address / --num_processes / --process_id, or MXDNA_* environment variables).
Resumes from the latest good checkpoint in WORKDIR/checkpoints unless --noresume.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file (get_config())",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics.jsonl, tb/)")
_RESUME = flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --workdir")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mxdna_jax import distributed

    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
    from mxdna_jax import pretrain

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("mxdna_jax").setLevel(logging.INFO)
    try:
        pretrain.run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)
    except pretrain.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the last good checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(lambda argv: sys.exit(main(argv)))
