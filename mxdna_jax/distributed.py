"""Multi-process start-up: `jax.distributed.initialize` from flags, env vars or jax's own
cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes). Call before anything touches a
JAX backend (jax.devices(), any array op)."""

from __future__ import annotations

import logging
import os

import jax

ENV_COORDINATOR = "MXDNA_COORDINATOR"
ENV_NUM_PROCESSES = "MXDNA_NUM_PROCESSES"
ENV_PROCESS_ID = "MXDNA_PROCESS_ID"

log = logging.getLogger(__name__)


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, auto_detect: bool = True) -> bool:
    """Join a multi-process run if one is configured; True when jax.distributed is initialised.

    Explicit arguments win over MXDNA_* env vars; with neither, jax's cluster auto-detection is
    tried and a plain single-process run is the fallback (returns False).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])

    # CPU processes need a collectives backend to talk to each other; it only affects the CPU
    # client, so setting it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError(f"coordinator {coordinator_address!r} given but num_processes={num_processes}, "
                             f"process_id={process_id}; set all three (flags or {ENV_NUM_PROCESSES}/"
                             f"{ENV_PROCESS_ID})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif num_processes is not None and num_processes > 1:
        raise ValueError(f"num_processes={num_processes} but no coordinator address "
                         f"(flag or {ENV_COORDINATOR})")
    elif auto_detect:
        try:
            jax.distributed.initialize()
        except ValueError as e:  # no cluster environment detected: single process
            log.debug("jax.distributed auto-detection found no cluster: %s", e)
            return False
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
