"""Accelerator readiness without an accelerator: the jitted forward and train step lower for the
`cuda` and `tpu` platforms with `jax.export` (cross-platform lowering needs no device).

`jax.export` itself refuses custom calls without a compatibility guarantee (host callbacks, CPU
kernels); on top of that every custom call left in the serialized module must be one that the
target platform runs, and nothing may name a host callback or a CPU-only kernel.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from mxdna_jax import optim, sharding, train_lib
from mxdna_jax.config import ModelConfig
from mxdna_jax.model import MxDNAForMaskedLM
from mxdna_jax.objectives.mlm import mlm_loss_fn

PLATFORMS = ("cuda", "tpu")
# configs/tiny.py's sizes (head_dim 16), compact mode, a batch of 2 x 64
CFG = ModelConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_nucleotide_layers=2,
                  num_token_layers=2, max_position_embeddings=512, mode="compact")
B, L, CAPACITY = 2, 64, 32

# custom calls an accelerator module may keep: sharding annotations (and cuDNN attention, which
# appears only when lowering on a host that has cuDNN)
ALLOWED_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement"}
ALLOWED_PREFIXES = ("__cudnn$fmha",)
# anything that only runs on a CPU host: Python callbacks, LAPACK/DUCC kernels, CPU-named targets
CPU_ONLY = re.compile(r"callback|lapack|ducc|cpu", re.IGNORECASE)


def custom_call_targets(mlir_text: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call\s*@([\w$.\-]+)", mlir_text)) | set(
        re.findall(r'call_target_name\s*=\s*"([^"]+)"', mlir_text))


def assert_accelerator_clean(exp: export.Exported, platform: str):
    assert exp.platforms == (platform,)
    text = exp.mlir_module()
    targets = custom_call_targets(text)
    bad = {t for t in targets if t not in ALLOWED_CUSTOM_CALLS and not t.startswith(ALLOWED_PREFIXES)}
    assert not bad, f"{platform}: custom calls that may not run there: {sorted(bad)}"
    cpu = sorted(set(CPU_ONLY.findall(" ".join(targets))) | set(re.findall(r"xla_\w*callback\w*", text)))
    assert not cpu, f"{platform}: CPU-only constructs in the module: {cpu}"
    assert len(exp.mlir_module_serialized) > 0  # the portable StableHLO bytecode


def batch_specs(with_labels: bool):
    spec = {k: jax.ShapeDtypeStruct((B, L), jnp.int32) for k in ("input_ids", "attention_mask", "special_tokens_mask")}
    if with_labels:
        spec["labels"] = jax.ShapeDtypeStruct((B, L), jnp.int32)
    return spec


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])  # a data-parallel mesh: shardings lower too


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_exports(dtype, mesh):
    cfg = CFG.replace(dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(params=0))))

    @jax.jit
    def forward(state, b):
        out = nnx.merge(graphdef, state)(b["input_ids"], b["attention_mask"], b["special_tokens_mask"],
                                         token_capacity=CAPACITY)
        return out.logits, out.overflow, out.backbone.token_hidden

    with jax.set_mesh(mesh):
        for platform in PLATFORMS:
            exp = export.export(forward, platforms=(platform,))(state, batch_specs(False))
            assert exp.out_avals[0].shape == (B, L, cfg.vocab_size)
            assert exp.out_avals[2].dtype == jnp.dtype(dtype)
            assert_accelerator_clean(exp, platform)


@pytest.mark.parametrize("dtype,loop", [("float32", "unrolled"), ("bfloat16", "scan")])
def test_train_step_exports(dtype, loop, mesh):
    tx, sched = optim.make_optimizer(dict(lr=1e-3, warmup_steps=1, steps=10, min_lr_ratio=0.1, weight_decay=0.01,
                                          b1=0.9, b2=0.98, grad_clip=1.0))
    ctor = lambda: MxDNAForMaskedLM(CFG.replace(layer_loop=loop), rngs=nnx.Rngs(params=0))
    graphdef, abstract = train_lib.abstract_train_state(ctor, tx)
    shardings = train_lib.state_shardings(abstract, tx, mesh)
    step = train_lib.make_train_step(mlm_loss_fn, tx, graphdef, shardings, mesh, compute_dtype=dtype,
                                     schedule=sched)
    with jax.set_mesh(mesh):
        for platform in PLATFORMS:
            exp = export.export(step.jitted, platforms=(platform,))(abstract, batch_specs(True), CAPACITY)
            assert exp.nr_devices == 2
            assert_accelerator_clean(exp, platform)


def test_the_check_catches_a_host_callback(mesh):
    """A CPU-only construct must fail: a host callback is refused by the export itself (how it
    is refused depends on the jax version: no callback lowering for a device-less platform, or
    a custom call without a compatibility guarantee)."""
    def f(x):
        jax.debug.callback(lambda v: None, x)
        return x * 2

    with pytest.raises(ValueError, match="custom call|callback|platform"):
        export.export(jax.jit(f), platforms=("cuda",))(jax.ShapeDtypeStruct((4,), jnp.float32))
    assert CPU_ONLY.search("xla_ffi_python_cpu_callback") and not CPU_ONLY.search("Sharding")


def test_the_scan_sees_cpu_kernels():
    """The module scan itself: a CPU lowering that uses a LAPACK kernel is flagged."""
    exp = export.export(jax.jit(jnp.linalg.cholesky), platforms=("cpu",))(jax.ShapeDtypeStruct((4, 4), jnp.float32))
    assert any("lapack" in t for t in custom_call_targets(exp.mlir_module()))
    with pytest.raises(AssertionError, match="lapack"):
        assert_accelerator_clean(exp, "cpu")
