"""glibc malloc settings for CPU runs (mxdna_jax/host_malloc.py): when they apply, and that a
freed large block is kept for reuse instead of being unmapped (XLA:CPU mapped its temporaries afresh every step)."""

import json
import subprocess
import sys

import pytest

from mxdna_jax import host_malloc

# Allocate, touch and free a 64 MiB block (above glibc's largest dynamic mmap threshold, 32 MiB)
# and report how much of it the process still holds. Untuned, glibc maps the block with mmap and
# unmaps it on free (so the next one is mapped and faulted in again: XLA's temporaries every step);
# tuned, the block comes from the heap and stays there for the next allocation.
PROBE = """
import json, os, sys
from mxdna_jax import host_malloc
applied = host_malloc.tune_for_xla_cpu({"JAX_PLATFORMS": "cpu"}) if sys.argv[1] == "tune" else False
import numpy as np
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
a = np.ones(64 << 17)  # 64 MiB of float64, every page written
held = rss() - before
del a
print(json.dumps({"applied": applied, "state": host_malloc.state, "held": held, "kept": rss() - before}))
"""


def probe(mode):
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tuned_process_reuses_freed_large_blocks():
    plain, tuned = probe("plain"), probe("tune")
    assert not plain["applied"] and tuned["applied"] and tuned["state"] == "tuned"
    mib = 1 << 20
    assert plain["held"] > 60 * mib and tuned["held"] > 60 * mib, (plain, tuned)
    assert plain["kept"] < 8 * mib, plain  # unmapped on free
    assert tuned["kept"] > 60 * mib, tuned  # kept for reuse


@pytest.mark.parametrize("env,state", [
    ({"MXDNA_MALLOC_TUNING": "0", "JAX_PLATFORMS": "cpu"}, "off (MXDNA_MALLOC_TUNING=0)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "JAX_PLATFORMS": "cpu"}, "off (GLIBC_TUNABLES set)"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "off (not a CPU run)"),
    ({"JAX_PLATFORMS": "tpu"}, "off (not a CPU run)"),
])
def test_not_applied_where_it_should_not_be(env, state, monkeypatch):
    monkeypatch.setattr(host_malloc, "state", "not applied")
    assert host_malloc.tune_for_xla_cpu(env) is False and host_malloc.state == state


def test_cpu_detection_without_jax_platforms(monkeypatch):
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(host_malloc.importlib.metadata, "distributions", lambda: [Dist("jax"), Dist("flax")])
    assert host_malloc.will_run_on_cpu({})
    monkeypatch.setattr(host_malloc.importlib.metadata, "distributions",
                        lambda: [Dist("jax"), Dist("jax-cuda13-plugin")])
    assert not host_malloc.will_run_on_cpu({})
    assert host_malloc.will_run_on_cpu({"JAX_PLATFORMS": "cpu"})
