"""Test setup: 8 fake CPU devices, strict rank promotion, fixture paths.

XLA_FLAGS must be set before JAX creates a backend, so this runs at import time.
"""

import os
import pathlib
import shutil
import tempfile

# XLA:CPU spends most of a test's time in LLVM; the tests' programs are small, so trade
# run-time speed for compile speed (MXDNA_TEST_XLA_OPT=2 restores the default optimisation).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + f" --xla_backend_optimization_level={os.environ.get('MXDNA_TEST_XLA_OPT', '0')}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole session: the xdist workers inherit this
# variable from the controller, and the train.py/eval.py subprocesses of the CLI tests get it
# through test_train.env_for, so the many runs of one tiny config compile once (compiling, not
# running, is most of their time). The cache key covers the program, flags and devices.
CACHE_VAR = "MXDNA_TEST_COMPILE_CACHE"
_OWN_CACHE = CACHE_VAR not in os.environ
if _OWN_CACHE:
    os.environ[CACHE_VAR] = tempfile.mkdtemp(prefix="mxdna-jax-test-compile-cache-")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it removes it
        shutil.rmtree(os.environ[CACHE_VAR], ignore_errors=True)


def compile_cache_env() -> dict[str, str]:
    """Environment variables that point a subprocess's JAX at the session's compilation cache."""
    return {"JAX_COMPILATION_CACHE_DIR": os.environ[CACHE_VAR], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


def shared_path(*parts):
    """A path under ../shared, or skip the test when this checkout has no shared/ beside it."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="module")
def jax_compile_cache():
    """The session's persistent compilation cache (compile_cache_env) turned on in this process for
    one test module.

    Tests that rebuild identical jitted steps (fresh closures, same HLO) then compile once; XLA on
    CPU takes seconds per train step. Restores the previous settings afterwards.
    """
    from jax.experimental.compilation_cache import compilation_cache

    # the same settings a subprocess gets through its environment: JAX_FOO_BAR -> jax_foo_bar
    settings = {k.lower(): v for k, v in compile_cache_env().items()}
    old = {n: getattr(jax.config, n) for n in settings}
    for n, v in settings.items():
        jax.config.update(n, type(old[n])(v) if old[n] is not None else v)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is on
    yield
    for n, v in old.items():
        jax.config.update(n, v)
