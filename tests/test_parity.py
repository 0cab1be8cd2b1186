"""Parity with the official PyTorch MxDNA on the stored fixtures (../shared/reference)."""

import json

import numpy as np
import pytest

from mxdna_jax import parity
from conftest import SHARED

FIXTURES = ["public_small", "public_medium"]  # public_small_nopad: through the check CLI below


def fixture_path(name, fixtures_dir):
    p = fixtures_dir / f"{name}.npz"
    if p.exists():
        return p
    p = SHARED / "reference" / f"{name}.npz"  # the 13 MB medium fixture is read from shared/
    if not p.exists():
        pytest.skip(f"{name}.npz not present")
    return p


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_run(request, fixtures_dir):
    fx = parity.load_fixture(fixture_path(request.param, fixtures_dir))
    cfg = parity.fixture_config(fx)
    return request.param, fx, parity.run_fixture(fx, cfg)


def test_every_key_within_tolerance(fixture_run):
    name, fx, ours = fixture_run
    rows = parity.compare(fx, ours)
    keys = {r["key"] for r in rows}
    expected = {"mlm_logits", "router_logits", "nms_center", "nms_all", "moe_output", "conversion_output",
                "token_layer_outputs", "final_hidden", "decoder_output", "aux_loss", "mlm_ce_loss",
                "mlm_loss_total", "router_z_loss", "cls_logits", "cls_head_input", "token_extraction",
                "deform_offset", "deform_modulator_logit", "nucleotide_layer_outputs"}
    if name != "public_small_nopad":
        expected |= {"train_router_logits", "train_nms_center", "train_nms_all", "train_mlm_logits"}
    assert expected <= keys, expected - keys
    bad = [(r["key"], r["error"], r["tol"]) for r in rows if not r["ok"]]
    assert not bad, bad
    # the headline keys are far inside the tolerance
    err = {r["key"]: r["error"] for r in rows}
    assert err["mlm_logits"] < 2e-6 and err["cls_logits"] < 1e-6 and err["mlm_loss_total"] < 2e-6


def test_compact_mode_matches_fixture(fixture_run, fixtures_dir):
    """Compact mode (tokens gathered to a capacity) gives the fixture's numbers too."""
    name, fx, _ = fixture_run
    if name != "public_small":
        pytest.skip("one fixture is enough for the compact layout")
    cfg = parity.fixture_config(fx, mode="compact", token_capacity_fraction=0.9)
    ours = parity.run_fixture(fx, cfg)
    rows = {r["key"]: r for r in parity.compare(fx, ours)}
    for key in ("mlm_logits", "cls_logits", "token_extraction", "mlm_loss_total", "aux_loss", "nms_center",
                "train_mlm_logits"):
        assert rows[key]["ok"], rows[key]
    assert "final_hidden" not in ours  # compact mode never computes the non-token rows


def test_check_cli_exit_codes(fixtures_dir, tmp_path, capsys):
    from mxdna_jax.convert_cli import main

    path = fixtures_dir / "public_small_nopad.npz"
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mlm_logits" in out and "all" in out
    assert main(["check", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # the JSON table alone
    assert rows and all(r["ok"] for r in rows) and "mlm_logits" in {r["key"] for r in rows}
    # a fixture whose stored logits were perturbed must fail the check
    z = dict(np.load(path))
    z["mlm_logits"] = z["mlm_logits"] + 1e-3
    bad = tmp_path / "bad.npz"
    np.savez(bad, **z)
    assert main(["check", str(bad)]) == 1
