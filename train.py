"""Pretrain MxDNA with masked language modelling.

    python train.py --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=500 ...]

Runs on one device, on a mesh of local devices, or on many hosts under jax.distributed
(--coordinator_address / --num_processes / --process_id, or MXDNA_* environment variables).
Resumes from the latest good checkpoint in WORKDIR/checkpoints unless --noresume.
SIGTERM / Ctrl-C: the current step is finished and checkpointed, then the run exits with 75.
Exit codes: see mxdna_jax/cli.py (0 ok, 2 bad input, 3 non-finite loss, 4 checkpoint write
failed, 75 preempted).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mxdna_jax import cli, host_malloc  # light (os, sys): the heavy imports wait until flags are parsed

cli.default_config_flag(__file__, __name__)  # configs/tiny.py of this repository unless --config
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config())",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics.jsonl, tb/)")
_RESUME = flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --workdir")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "resume even though the data/train config differs from the checkpoint's "
                                  "(recorded as a config_changed event)")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        return cli.fail(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    from mxdna_jax import distributed

    try:
        distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
    except ValueError as e:
        return cli.fail(e)
    from absl import logging as absl_logging

    from mxdna_jax import checkpoint, pretrain, preemption, train_lib

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("mxdna_jax").setLevel(logging.INFO)
    workdir = cli.abspath(_WORKDIR.value)  # once, here: Orbax needs absolute paths
    try:
        with preemption.StopSignal() as stop:
            pretrain.run(_CONFIG.value, workdir, resume=_RESUME.value, allow_config_change=_ALLOW_CHANGE.value,
                         stop_signal=stop)
    except cli.UserError as e:
        return cli.fail(e, cli.EXIT_BAD_INPUT)
    except checkpoint.CorruptCheckpointError as e:
        return cli.fail(e, cli.EXIT_BAD_INPUT)
    except train_lib.NonFiniteLossError as e:  # the last good checkpoint is kept
        return cli.fail(e, cli.EXIT_NON_FINITE)
    except (checkpoint.CheckpointSaveError, OSError) as e:
        # Disk full or permissions. Orbax's background writers of the failed save may still be
        # unwinding; a normal interpreter shutdown would print their errors after ours, so leave
        # at once (the previous checkpoint and every metrics line are already on disk).
        what = e if isinstance(e, checkpoint.CheckpointSaveError) else f"I/O error while training in {workdir}: {e}"
        cli.fail(what, cli.EXIT_CHECKPOINT_FAILED)
        sys.stdout.flush()
        os._exit(cli.EXIT_CHECKPOINT_FAILED)
    except preemption.Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return cli.EXIT_PREEMPTED
    except Exception as e:  # noqa: BLE001  device OOM: a config too big for this machine, not a bug
        if "RESOURCE_EXHAUSTED" not in str(e) or type(e).__name__ != "JaxRuntimeError":
            raise
        return cli.fail(f"out of device memory ({cli.one_line(e).split(': ', 1)[-1]}); this config does not fit "
                        f"{jax_devices()}: lower data.global_batch_size or data.window, raise train.grad_accum_steps, "
                        "or set model.remat=True with model.remat_policy='nothing'; the newest checkpoint is kept",
                        cli.EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return cli.fail("aborted by a second Ctrl-C without saving; the newest complete checkpoint is kept", 130)
    return cli.EXIT_OK


def jax_devices() -> str:
    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


if __name__ == "__main__":
    host_malloc.tune_for_xla_cpu()  # before JAX starts its CPU threads (mxdna_jax/host_malloc.py)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
