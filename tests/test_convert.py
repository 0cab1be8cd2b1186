"""Official weights <-> our params: exact round trip, safetensors, the base config's names."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mxdna_jax import convert, convert_cli, heads, parity
from mxdna_jax.config import ModelConfig
from mxdna_jax.model import MxDNAForMaskedLM, MxDNAForSequenceClassification


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return parity.load_fixture(fixtures_dir / "public_small.npz")


def official_sd(fx, prefix="param/"):
    return {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}


def test_round_trip_is_exact(fx):
    sd = official_sd(fx)
    m = MxDNAForMaskedLM(parity.fixture_config(fx), rngs=nnx.Rngs(0))
    convert.load_into(m, sd)
    back = convert.export_state_dict(m)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_from_official_safetensors_with_config(fx, tmp_path):
    from safetensors.numpy import save_file

    save_file(official_sd(fx), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(str(fx["config_json"]))
    m = convert.from_official(tmp_path / "model.safetensors")
    assert m.cfg.mode == "original" and not m.cfg.batch_independent  # parity semantics by default
    np.testing.assert_array_equal(np.asarray(m.model.embed[...]), fx["param/model.embed_tokens.weight"])
    # a classifier from the MLM checkpoint: backbone loaded, fresh head
    c = convert.from_official(tmp_path / "model.safetensors", head="cls", num_labels=3)
    assert isinstance(c, MxDNAForSequenceClassification)
    assert c.out_proj.kernel.shape == (64, 3)
    np.testing.assert_array_equal(np.asarray(c.model.embed[...]), fx["param/model.embed_tokens.weight"])


def test_missing_and_misshapen_tensors_are_named(fx):
    sd = official_sd(fx)
    m = MxDNAForMaskedLM(parity.fixture_config(fx), rngs=nnx.Rngs(0))
    broken = dict(sd)
    del broken["lm_head.bias"]
    with pytest.raises(KeyError, match="lm_head.bias"):
        convert.load_into(m, broken)
    broken = dict(sd, **{"model.conversion_layer.gate.weight": np.zeros((9, 64), np.float32)})
    with pytest.raises(ValueError, match="gate.weight"):
        convert.load_into(m, broken)
    with pytest.raises(KeyError, match="no place"):
        convert.load_into(m, dict(sd, **{"extra.weight": np.zeros(3, np.float32)}))


def test_base_config_covers_every_official_name():
    """The paper's 100M model: every param maps to one official tensor (no weights materialised)."""
    cfg = ModelConfig.from_official({
        "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 21, "conversion_layer_idx": 4,
        "num_attention_heads": 16, "num_key_value_heads": 16, "expert_kernel_sizes": list(range(1, 11))})
    assert (cfg.num_nucleotide_layers, cfg.num_token_layers) == (4, 16)
    assert ModelConfig().replace(batch_independent=False, mode="original") == cfg
    abstract = nnx.eval_shape(lambda: MxDNAForMaskedLM(cfg, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    rules = convert.mlm_rules(cfg)
    targets = {r[1] if r[1] in flat else r[1][:-1] for r in rules}
    assert targets == set(flat)
    assert len({r[0] for r in rules}) == len(rules)
    n_params = sum(int(np.prod(v.shape)) for v in flat.values())
    assert 95e6 < n_params < 110e6, n_params
    assert cfg.expert_groups() == (1, 2, 2, 4, 4, 4, 8, 8, 8, 8)


def test_config_typo_fails_loudly():
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=65, num_attention_heads=4)


# ------------------------------------------------------------------ export from a train.py run


def _flat(model):
    from mxdna_jax import params_io

    return params_io.flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_export_accepts_a_workdir_a_step_dir_and_a_params_dir(tmp_path, capsys):
    from test_checkpoint_integrity import make_workdir

    from mxdna_jax import params_io

    wd = tmp_path / "run"
    saved = make_workdir(wd)
    # newest verified step of a workdir; then one named step; then the params dir `import` writes
    assert convert_cli.main(["export", str(wd), str(tmp_path / "a" / "model.safetensors")]) == 0
    assert "(step 2)" in capsys.readouterr().out
    assert convert_cli.main(["export", str(wd / "checkpoints" / "1"), str(tmp_path / "b" / "model.safetensors")]) == 0
    for sub, step in (("a", 2), ("b", 1)):
        m = convert.from_official(tmp_path / sub / "model.safetensors")  # config.json written beside it
        got = _flat(m)
        assert got.keys() == saved[step].keys()
        for k in got:
            np.testing.assert_array_equal(got[k], saved[step][k], err_msg=f"{sub}: {k}")
    params_io.save_params(params_io.load_from_workdir(wd).model, tmp_path / "pdir")
    assert convert_cli.main(["export", str(tmp_path / "pdir"), str(tmp_path / "c" / "model.safetensors")]) == 0
    np.testing.assert_array_equal(_flat(convert.from_official(tmp_path / "c" / "model.safetensors"))["model/embed"],
                                  saved[2]["model/embed"])

    # The same sources as warm-start params (flat, our names), official weights included.
    for source, step in ((wd, 2), (wd / "checkpoints" / "1", 1), (tmp_path / "pdir", 2),
                         (tmp_path / "a" / "model.safetensors", 2)):
        got = params_io.source_params(source)
        assert got.keys() == saved[step].keys(), source
        for k in got:
            np.testing.assert_array_equal(got[k], saved[step][k], err_msg=f"{source}: {k}")


def test_export_bad_sources_exit_2_and_write_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o" / "model.safetensors"
    for source, expect in ((tmp_path / "nope", "not found"), (tmp_path / "empty", "is neither official weights")):
        assert convert_cli.main(["export", str(source), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expect in err and err.count("\n") == 1, err
    assert convert_cli.main(["export", str(tmp_path / "empty"), str(tmp_path / "model.bin")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert not out.parent.exists() and not (tmp_path / "model.bin").exists()


def test_official_params_match_from_official(fx, tmp_path):
    from safetensors.numpy import save_file

    sd = official_sd(fx)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(str(fx["config_json"]))
    want = _flat(convert.from_official(tmp_path / "model.safetensors"))
    got = convert.official_params(tmp_path / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    backbone_only = {k: v for k, v in sd.items() if k.startswith("model.")}
    save_file(backbone_only, str(tmp_path / "backbone.safetensors"))
    got = convert.official_params(tmp_path / "backbone.safetensors")
    assert got.keys() == {k for k in want if k.startswith("model/")}
    with pytest.raises(FileNotFoundError, match="official config not found"):
        convert.official_params(tmp_path / "model.safetensors", tmp_path / "nope.json")


# ------------------------------------------------------------------ heads and module layout


def test_every_registered_head_has_conversion_rules_covering_its_params():
    assert set(convert.RULES) == set(heads.HEAD_NAMES)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_nucleotide_layers=1,
                      num_token_layers=1)
    for head in heads.HEAD_NAMES:
        abstract = nnx.eval_shape(lambda: heads.build_model(cfg, head))
        flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
        exported = {k for k in flat if k[0] not in convert.UNOFFICIAL.get(head, ())}
        assert {r[1] if r[1] in flat else r[1][:-1] for r in convert.rules_for(abstract)} == exported, head
    with pytest.raises(TypeError, match="no conversion rules"):
        convert.rules_for(object())


def test_from_official_fresh_head_is_the_registry_seed_0_initialisation(fx, tmp_path):
    """A classifier from an MLM checkpoint keeps exactly the head `heads.build_model(cfg, 'cls')`
    initialises (seed 0), so conversion, params_io and train.py agree on fresh weights."""
    from safetensors.numpy import save_file

    save_file(official_sd(fx), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(str(fx["config_json"]))
    c = convert.from_official(tmp_path / "model.safetensors", head="cls")
    assert heads.head_name(c) == "cls"
    fresh = _flat(heads.build_model(c.cfg, "cls"))
    got = _flat(c)
    head_params = [k for k in got if not k.startswith("model/")]
    assert head_params
    for k in head_params:
        np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
    with pytest.raises(ValueError, match="head must be one of"):
        convert.from_official(tmp_path / "model.safetensors", head="lm")


def test_library_modules_do_not_import_the_command_line():
    """convert is a library (no parity, no CLI); parity may use convert but not the CLI;
    `python -m mxdna_jax.convert_cli` works as well as `python -m mxdna_jax.convert`."""
    probe = ("import sys, mxdna_jax.convert; assert 'mxdna_jax.parity' not in sys.modules; "
             "assert 'mxdna_jax.convert_cli' not in sys.modules; import mxdna_jax.parity; "
             "assert 'mxdna_jax.convert_cli' not in sys.modules")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "mxdna_jax.convert_cli", "import", "--help"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "{" + ",".join(heads.HEAD_NAMES) + "}" in r.stdout, r.stdout + r.stderr[-3000:]
