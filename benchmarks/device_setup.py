"""Make the project importable on a machine without network (benchmarks/device_check.sh, step setup).

    python benchmarks/device_setup.py --wheels benchmarks/wheels --site DIR --stubs DIR [--editable]

Standard library only (it runs before anything is installed). For each module the check's path
imports, in dependency order: nothing if it imports already (the image's own version wins),
else its wheel from --wheels goes into --site (`pip install --target --no-deps --no-index`, or,
without a usable pip, the wheel unzipped there: pure-Python wheels need nothing else). If `grain`
still does not import (a compiled wheel for another Python), an import stub is written to
--stubs: the check's path only imports grain (mxdna_jax.data's pipeline module), it never calls
it. Then the project's own imports are checked in a fresh interpreter with
PYTHONPATH=stubs:site:repo, which device_check.sh exports. `--editable` also tries
`pip install --no-deps --no-index --no-build-isolation -e .` (PYTHONPATH covers a failure).
Exit status 1 only if the project's imports fail.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]

# (import name, wheel file prefix), dependencies first
MODULES = [
    ("absl", "absl_py"), ("etils", "etils"), ("yaml", "pyyaml"), ("google.protobuf", "protobuf"),
    ("psutil", "psutil"), ("cloudpickle", "cloudpickle"), ("portpicker", "portpicker"),
    ("array_record", "array_record"), ("grain", "grain"), ("ml_collections", "ml_collections"),
    ("tqdm", "tqdm"), ("safetensors", "safetensors"),
]
# what device_check.sh runs: the parity CLI, the benchmarks' imports, the configs
PROJECT_IMPORTS = ["mxdna_jax.convert_cli", "mxdna_jax.parity", "mxdna_jax.train_lib", "mxdna_jax.model",
                   "mxdna_jax.objectives.mlm", "mxdna_jax.data.masking", "mxdna_jax.data.fasta",
                   "mxdna_jax.capacity", "mxdna_jax.layers", "configs.base", "configs.tiny"]
VERSIONS = ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "grain", "ml_collections",
            "absl", "etils", "yaml", "google.protobuf", "tensorstore"]

GRAIN_STUB = '''"""Import stub written by benchmarks/device_setup.py: grain could not be installed here.
The device check only imports grain (mxdna_jax.data.pipeline); any use of it fails loudly."""


__version__ = "stub"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(f"grain.{name}: grain is a stub on this machine (benchmarks/device_setup.py)")
'''


def env_with(paths):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def imports(module: str, paths, timeout=120) -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env_with(paths), capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def have_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install(wheel: str, site: pathlib.Path, use_pip: bool) -> str:
    if use_pip:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                            "--disable-pip-version-check", "--upgrade", "--target", str(site), wheel],
                           capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            return "pip"
        err = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"    pip refused {os.path.basename(wheel)}: {err}", flush=True)
    with zipfile.ZipFile(wheel) as z:  # a wheel is a zip of the site-packages tree
        z.extractall(site)
    return "unzipped"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", default=str(REPO / "benchmarks" / "wheels"))
    p.add_argument("--site", required=True)
    p.add_argument("--stubs", required=True)
    p.add_argument("--editable", action="store_true")
    p.add_argument("--json", default=None, help="write what was done here")
    a = p.parse_args(argv)
    site, stubs = pathlib.Path(a.site), pathlib.Path(a.stubs)
    site.mkdir(parents=True, exist_ok=True)
    stubs.mkdir(parents=True, exist_ok=True)
    paths = [stubs, site, REPO]
    print(f"python {sys.version.split()[0]} at {sys.executable}; wheels from {a.wheels}", flush=True)
    use_pip = have_pip()
    report = {"python": sys.version, "pip": use_pip, "modules": {}, "stubs": [], "editable": None}
    for mod, prefix in MODULES:
        ok, err = imports(mod, paths)
        if ok:
            report["modules"][mod] = "present"
            continue
        wheels = sorted(w for w in glob.glob(os.path.join(a.wheels, "*.whl"))
                        if os.path.basename(w).lower().startswith(prefix.lower() + "-"))
        if not wheels:
            report["modules"][mod] = f"missing, no wheel ({err})"
            print(f"  {mod}: missing and no wheel in {a.wheels} ({err})", flush=True)
            continue
        how = install(wheels[-1], site, use_pip)
        ok, err = imports(mod, paths)
        report["modules"][mod] = f"installed ({how}) from {os.path.basename(wheels[-1])}" if ok else \
            f"install failed ({how}): {err}"
        print(f"  {mod}: {report['modules'][mod]}", flush=True)
    if not imports("grain", paths)[0]:
        (stubs / "grain").mkdir(exist_ok=True)
        (stubs / "grain" / "__init__.py").write_text(GRAIN_STUB)
        report["stubs"].append("grain")
        print("  grain: not importable, import stub written (the check's path only imports it)", flush=True)
    if a.editable and use_pip:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                            "--no-build-isolation", "--disable-pip-version-check", "-e", str(REPO)],
                           capture_output=True, text=True, timeout=180, env=env_with(paths))
        report["editable"] = "ok" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  pip install -e . : {report['editable']} (PYTHONPATH has the repo either way)", flush=True)
    code = ("import importlib, json\n"
            f"mods = {PROJECT_IMPORTS!r}\n"
            "bad = {}\n"
            "for m in mods:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        bad[m] = f'{type(e).__name__}: {e}'\n"
            "ver = {}\n"
            f"for m in {VERSIONS!r}:\n"
            "    try:\n"
            "        ver[m] = getattr(importlib.import_module(m), '__version__', '?')\n"
            "    except Exception as e:\n"
            "        ver[m] = 'not importable'\n"
            "print(json.dumps({'failed': bad, 'versions': ver}))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env_with(paths), capture_output=True, text=True,
                       timeout=300, cwd=str(REPO))
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"failed": {"<interpreter>": r.stderr.strip()[-2000:]}, "versions": {}}
    report.update(res)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), flush=True)
    for m, e in res["failed"].items():
        print(f"  IMPORT FAILED {m}: {e}", flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print("project imports: " + ("ok" if not res["failed"] else f"{len(res['failed'])} failed"), flush=True)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
