"""Every sharding decision in one place: logical axis -> mesh axis rules, the mesh, placement.

The model tags each `nnx.Param` with plain metadata `logical_axes=(name | None, ...)`; nothing in
the model refers to mesh axes. This module turns those names into `NamedSharding`s through
`LOGICAL_RULES`, so changing the parallelism layout (e.g. turning FSDP on for 'embed') is an edit
to one table.

Mesh axes, outermost to innermost (the innermost gets the fastest interconnect on TPU/GPU):
  data   pure data parallelism: params replicated, batch split.
  fsdp   batch split AND params sharded along 'embed' (ZeRO-3 style; XLA all-gathers per use).
  model  tensor parallelism: FFN/attention/vocab features split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis (a name, a tuple of names, or None = replicated).
LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    # params
    "vocab": "model",
    "embed": "fsdp",
    "mlp": "model",
    "qkv": "model",
    # 10 experts of different kernel sizes: too few and too uneven to split usefully.
    "experts": None,
    "taps": None,
    "conv_in": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh with Auto axes; one size may be -1 (= all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} model={model}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes (product {known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} model={sizes[2]} needs {math.prod(sizes)} "
                         f"devices, have {len(devices)}")
    # Auto axes: explicit-sharding axes break the embedding gathers (see DESIGN.md pitfalls).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from a config's `mesh` section."""
    return make_mesh(int(mesh_cfg["data"]), int(mesh_cfg["fsdp"]), int(mesh_cfg["model"]), devices=devices)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims carry `logical_axes`.

    A dim falls back to replicated when its size is not divisible by the mesh axis size, when the
    mesh axis is already used by an earlier dim (a spec may name each mesh axis once), or when the
    mesh axis has size 1 (keeps specs minimal and comparable).
    """
    if logical_axes is None:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical_axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
        axis = rules.get(name) if name is not None else None
        if axis is not None:
            names = (axis,) if isinstance(axis, str) else tuple(axis)
            names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
            if not names or size % _axis_size(mesh, names):
                if names:
                    logging.debug("dim %s (size %d) not divisible by mesh %s: replicated", name, size, names)
                axis = None
            else:
                axis = names[0] if len(names) == 1 else names
                used.update(names)
        spec.append(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES) -> Any:
    """Same tree as `state` (an nnx.State or any tree of Variables/arrays), NamedSharding leaves.

    Variables keep their wrapper (with the sharding as value) so the result is a valid
    `in_shardings`/`out_shardings` for the state tree itself. Bare arrays are replicated.
    """

    def one(x):
        if _is_var(x):
            meta = x.get_metadata()
            value = x.get_value() if hasattr(x, "get_value") else x[...]
            spec = logical_to_spec(meta.get("logical_axes"), np.shape(value), mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over every batch-carrying mesh axis; other dims replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dim is split (every batch size must be a multiple of it)."""
    return _axis_size(mesh, LOGICAL_RULES["batch"])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an already-built model's state onto `mesh` following its logical_axes (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def host_batch_to_global(batch: Any, mesh: Mesh, global_batch_size: int | None = None) -> Any:
    """Assemble each process's slice of the global batch into global arrays sharded by batch.

    `batch` holds this process's rows (see `process_batch_slice`); on one process it is the
    whole batch. Give `global_batch_size` when a batch shard spans processes (jax can only infer
    the global shape when every process holds distinct rows).
    """
    sharding = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        shape = None if global_batch_size is None else (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, batch)


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(shard_index, num_shards): which equal slice of the global batch this process must load.

    Computed from the devices this process addresses, so it stays right when a batch shard spans
    several processes (e.g. the 'model' axis crossing hosts): those processes get the same index
    and must load identical rows.
    """
    sharding = batch_sharding(mesh)
    idx = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch_size)
                   for s in idx.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's batch rows {rows} are not contiguous; reorder the mesh devices")
    n = stop - start
    if global_batch_size % n:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of the per-process batch {n}")
    return start // n, global_batch_size // n
