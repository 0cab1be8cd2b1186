"""The `python -m mxdna_jax.convert` command line (also `python -m mxdna_jax.convert_cli`):

    check FIXTURE.npz [--mode compact] [--json]   # parity report against official outputs
    import WEIGHTS OUT_DIR [--config C] [--head H] # official weights -> Orbax params dir
    export SOURCE OUT.safetensors                  # ours -> official names + config.json

Exit codes (mxdna_jax.cli): 0 success; 1 `check` found keys over tolerance; 2 bad input (an
unreadable or incomplete fixture, a missing or damaged checkpoint, an existing output), one
`error:` line and nothing written.

Parsing and dispatch only: the work is done by the libraries `convert` (weights), `parity`
(fixtures) and `params_io` (params dirs and checkpoints), none of which imports this module.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mxdna_jax import cli as cli_lib
from mxdna_jax import convert, heads, params_io, parity


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxdna_jax.convert")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare a shared/reference-format fixture with this model")
    c.add_argument("fixture")
    c.add_argument("--mode", choices=("original", "compact"), default="original")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    i = sub.add_parser("import", help="official .safetensors/.npz (+config.json) -> our Orbax params dir")
    i.add_argument("weights")
    i.add_argument("out_dir")
    i.add_argument("--config", default=None, help="official config.json (default: next to the weights)")
    i.add_argument("--head", choices=heads.HEAD_NAMES, default="mlm")
    e = sub.add_parser("export", help="our params -> official-named .safetensors (+ config.json beside it)")
    e.add_argument("source", help="a params dir (from `import`), a train.py workdir (its newest verified "
                                   "checkpoint) or one checkpoint step dir (WORKDIR/checkpoints/STEP)")
    e.add_argument("out", help="the .safetensors file to write")
    return p


def _error_text(e: BaseException) -> str:
    # str(KeyError('x')) is "'x'": use the message itself
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _check(args) -> int:
    overrides = {"mode": args.mode}
    if args.mode == "compact":
        overrides["token_capacity_fraction"] = 1.0
    path = cli_lib.abspath(args.fixture)
    try:
        fx = parity.load_fixture(path)
        parity.check_fixture_complete(fx, path)
        cfg = parity.fixture_config(fx, **overrides)
        models = parity.build_models(fx, cfg)  # a missing or misshapen weight is the fixture's fault
    except cli_lib.UserError as e:
        return cli_lib.fail(e, cli_lib.EXIT_BAD_INPUT)
    except (KeyError, ValueError) as e:  # bad config_json, missing/misshapen official tensors
        return cli_lib.fail(f"fixture {path}: {_error_text(e)}", cli_lib.EXIT_BAD_INPUT)
    rows = parity.compare(fx, parity.run_fixture(fx, cfg, models=models))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'key':34s} {'max abs err':>12s} {'tol':>9s}")
        for r in rows:
            err = f"{r['error']} diff" if r["kind"] == "exact" else f"{r['error']:.3e}"
            print(f"{r['key']:34s} {err:>12s} {r['tol']:>9.1e} {'ok' if r['ok'] else 'FAIL'}")
    bad = [r["key"] for r in rows if not r["ok"]]
    if bad:
        print(f"over tolerance: {', '.join(bad)}", file=sys.stderr)
        return 1
    if not args.json:  # with --json, stdout is the JSON table alone
        print(f"all {len(rows)} keys within tolerance")
    return 0


def _import(args) -> int:
    weights, out_dir = cli_lib.abspath(args.weights), cli_lib.abspath(args.out_dir)
    if pathlib.Path(out_dir).exists() and any(pathlib.Path(out_dir).iterdir()):
        raise cli_lib.UserError(f"{out_dir} exists and is not empty; choose a new output directory")
    model = convert.from_official(weights, cli_lib.abspath(args.config), head=args.head)
    params_io.save_params(model, out_dir)
    print(f"wrote {out_dir}")
    return 0


def _export(args) -> int:
    from safetensors.numpy import save_file

    out = pathlib.Path(cli_lib.abspath(args.out))
    if out.suffix != ".safetensors":
        raise cli_lib.UserError(f"{out}: the output must be a .safetensors file")
    loaded = params_io.load_any(cli_lib.abspath(args.source))
    official_cfg = loaded.model.cfg.to_official()
    config_path = out.with_name("config.json")  # where from_official looks by default
    if config_path.exists() and _read_json(config_path) != official_cfg:
        raise cli_lib.UserError(f"{config_path} exists and describes another model; export to another directory")
    state_dict = convert.export_state_dict(loaded.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out))
    if not config_path.exists():
        config_path.write_text(json.dumps(official_cfg, indent=1))
    step = f" (step {loaded.step})" if loaded.step >= 0 else ""
    print(f"wrote {out} and {config_path} from {loaded.step_dir}{step}")
    return 0


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check":
        return _check(args)
    from mxdna_jax.checkpoint import CorruptCheckpointError

    try:
        return {"import": _import, "export": _export}[args.cmd](args)
    except (cli_lib.UserError, OSError, KeyError, ValueError, CorruptCheckpointError) as e:
        # bad input (paths, weights files, checkpoints): one line, nothing (more) written
        return cli_lib.fail(_error_text(e), cli_lib.EXIT_BAD_INPUT)


if __name__ == "__main__":
    raise SystemExit(main())
