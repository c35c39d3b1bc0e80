"""Faulty HF folders and conversion outputs (issue 8): stray safetensors files beside an index,
tensors of the wrong dtype, broken index/config files, an output on top of its input, and the
temporary folders that killed conversions leave."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import GOLDENS, load_safetensors, run_script, tol
from safetensors.numpy import save_file

import dsv3_jax
from dsv3_jax import convert_hf
from dsv3_jax.hf_io import CheckpointError

sys.path.insert(0, str(GOLDENS))
import fp8_checkpoint  # noqa: E402

SHARDED = GOLDENS / "a_qlora_yarn_sharded_mtp"  # 5 shards + index, mtp.safetensors indexed
SINGLE = GOLDENS / "b_qproj_vdim_dense2_nonorm"  # one model.safetensors, no index
INDEX = "model.safetensors.index.json"


def _copy(src, tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _listing(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing was written or deleted)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _golden_logits(model, golden):
    g = np.load(golden / "golden.npz")
    return np.asarray(model(g["input_ids"])), g["logits"]


def _weight_map(path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def _load_from(path, names) -> dict[str, np.ndarray]:
    """The tensors ``names`` from whichever files of ``path`` hold them."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        t = load_safetensors(f)
        out.update({n: t[n] for n in names if n in t})
    return out


def _one_error_line(r):
    """A refused convert.py run: non-zero, one `error:` line on stderr, no traceback."""
    assert r.returncode != 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. stray files
STRAY = {"model.norm.weight": 7.0, "lm_head.weight": -3.0}


@pytest.fixture
def with_stray(tmp_path):
    """The sharded golden plus `model.safetensors`: a consolidated copy whose final norm and head
    differ from the shards the index names."""
    src = _copy(SHARDED, tmp_path)
    t = _load_from(src, STRAY)
    stray = {n: (t[n] * s).astype(np.float32) for n, s in STRAY.items()}
    save_file(stray, src / "model.safetensors")
    return src


def test_stray_file_does_not_override_the_index(with_stray, caplog):
    with caplog.at_level(logging.WARNING, logger="dsv3_jax"):
        model = dsv3_jax.load_hf_checkpoint(with_stray)
    got, want = _golden_logits(model, SHARDED)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)
    stray = [r.getMessage() for r in caplog.records if "model.safetensors holds" in r.getMessage()]
    assert len(stray) == 1 and "2 tensor(s)" in stray[0] and "ignored" in stray[0], caplog.text
    want_norm = _load_from(SHARDED, ["model.norm.weight"])["model.norm.weight"]
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), want_norm)


def test_stray_file_does_not_override_the_index_in_convert_cli(with_stray, tmp_path, cli_env):
    out = tmp_path / "out"
    r = run_script(
        ["convert.py", "hf_to_orbax", f"--hf_dir={with_stray}", f"--output_dir={out}",
         "--dtype=float32", "--noprogress"],
        cli_env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.safetensors holds 2 tensor(s)" in r.stderr
    model, _ = dsv3_jax.load_checkpoint(out)
    got, want = _golden_logits(model, SHARDED)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)


def test_unindexed_mtp_shard_still_loads(tmp_path):
    """transformers does not index the MTP shard: files outside the index add the names it lacks."""
    src = _copy(SHARDED, tmp_path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "mtp.safetensors"}
    (src / INDEX).write_text(json.dumps(index))
    model = dsv3_jax.load_hf_checkpoint(src)
    assert model.num_mtp == 1
    eh = _load_from(src, ["model.layers.2.eh_proj.weight"])["model.layers.2.eh_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.mtp[0].eh_proj.kernel[...]).T, eh)


def _mtp_unindexed_twice(tmp_path):
    src = _copy(SHARDED, tmp_path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "mtp.safetensors"}
    (src / INDEX).write_text(json.dumps(index))
    shutil.copyfile(src / "mtp.safetensors", src / "mtp-copy.safetensors")
    return src


def test_unindexed_name_in_two_files_names_both(tmp_path):
    src = _mtp_unindexed_twice(tmp_path)
    before = _listing(tmp_path)
    for call in (
        lambda: dsv3_jax.load_hf_checkpoint(src),
        lambda: convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False),
    ):
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        assert "in both mtp-copy.safetensors and mtp.safetensors" in msg, msg
        assert "44 in both" in msg and "model.layers.2." in msg and str(src) in msg
    assert _listing(tmp_path) == before


def test_unindexed_name_in_two_files_cli(tmp_path, cli_env):
    src = _mtp_unindexed_twice(tmp_path)
    before = _listing(tmp_path)
    r = run_script(
        ["convert.py", "hf_to_orbax", f"--hf_dir={src}", f"--output_dir={tmp_path / 'out'}"],
        cli_env,
    )
    line = _one_error_line(r)
    assert "mtp-copy.safetensors and mtp.safetensors" in line
    assert _listing(tmp_path) == before


def test_same_name_in_two_files_without_index(tmp_path):
    src = _copy(SINGLE, tmp_path)
    t = load_safetensors(src / "model.safetensors")
    save_file({"model.norm.weight": t["model.norm.weight"] * 2}, src / "extra.safetensors")
    with pytest.raises(CheckpointError) as err:
        dsv3_jax.load_hf_checkpoint(src)
    msg = str(err.value)
    assert "1 in both extra.safetensors and model.safetensors" in msg, msg
    assert "['model.norm.weight']" in msg and "no model.safetensors.index.json" in msg


# ----------------------------------------------------------------------------- 8. dtypes
def _edit(path, fname, fn):
    t = load_safetensors(path / fname)
    fn(t)
    save_file(t, path / fname)


def test_non_float_tensors_are_listed(tmp_path):
    src = _copy(SINGLE, tmp_path)
    bad = {
        "model.norm.weight": np.int32,
        "model.layers.0.input_layernorm.weight": np.bool_,
        "model.layers.2.mlp.gate.e_score_correction_bias": np.int64,
    }

    def edit(t):
        for n, dt in bad.items():
            t[n] = t[n].astype(dt)

    _edit(src, "model.safetensors", edit)
    before = _listing(tmp_path)
    for call in (
        lambda: dsv3_jax.load_hf_checkpoint(src),
        lambda: convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False),
    ):
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        assert (
            "tensors of a non-float dtype (3): [('model.layers.0.input_layernorm.weight', 'BOOL'), "
            "('model.layers.2.mlp.gate.e_score_correction_bias', 'I64'), "
            "('model.norm.weight', 'I32')]"
        ) in msg, msg
    assert _listing(tmp_path) == before


def test_float16_and_bfloat16_weights_load(tmp_path):
    """Float dtypes other than float32 are accepted and read exactly."""
    src = _copy(SINGLE, tmp_path)
    head = "model.layers.0.self_attn.o_proj.weight"

    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
        t[head] = t[head].astype(ml_dtypes.bfloat16)

    _edit(src, "model.safetensors", edit)
    model = dsv3_jax.load_hf_checkpoint(src)
    t = load_safetensors(src / "model.safetensors")
    np.testing.assert_array_equal(
        np.asarray(model.norm.weight[...]), t["model.norm.weight"].astype(np.float32)
    )
    got = np.asarray(model.dense_layers.self_attn.o_proj.kernel[...][0]).T
    np.testing.assert_array_equal(got, t[head].astype(np.float32))


def test_fp8_where_no_scale_belongs_and_bad_scale_dtypes(fp8_dir, tmp_path):
    src = _copy(fp8_dir, tmp_path)
    fp8 = ml_dtypes.float8_e4m3fn
    w = "model.layers.1.self_attn.kv_b_proj.weight"  # scale in shard 2

    def edit1(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.float32).astype(fp8)
        t["model.norm.weight_scale_inv"] = np.ones((2,), np.float32)
        t["model.layers.0.mlp.down_proj.weight_scale_inv"] = t[
            "model.layers.0.mlp.down_proj.weight_scale_inv"
        ].astype(np.int32)

    def edit2(t):
        t[w + "_scale_inv"] = t[w + "_scale_inv"].astype(np.float16)

    _edit(src, "model-00001-of-00002.safetensors", edit1)
    _edit(src, "model-00002-of-00002.safetensors", edit2)
    with pytest.raises(CheckpointError) as err:
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert (
        "FP8 tensors where no scale belongs (only projection weights are FP8) (1): "
        "[('model.norm.weight', 'F8_E4M3')]"
    ) in msg, msg
    assert (
        "scales not float32 or bfloat16 (2): [('model.layers.0.mlp.down_proj.weight_scale_inv', "
        f"'I32'), ('{w}_scale_inv', 'F16')]"
    ) in msg, msg
    assert not (tmp_path / "out").exists()


def test_bfloat16_scales_are_accepted(fp8_dir, tmp_path):
    src = _copy(fp8_dir, tmp_path)
    w = "model.layers.1.self_attn.kv_b_proj.weight"
    bf16 = ml_dtypes.bfloat16

    def edit(t):
        t[w + "_scale_inv"] = t[w + "_scale_inv"].astype(bf16)

    _edit(src, "model-00002-of-00002.safetensors", edit)
    model = dsv3_jax.load_hf_checkpoint(src)
    t = _load_from(src, [w, w + "_scale_inv"])
    want = fp8_checkpoint.dequantize_f64(t[w], t[w + "_scale_inv"].astype(np.float64))
    got = np.asarray(model.moe_layers.self_attn.kv_b_proj.kernel[...][0]).T  # HF layer 1
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- 9. broken files
@pytest.mark.parametrize(
    "content, match",
    [
        ('{"metadata": {}}', "has no weight_map"),
        ("{not json", "is not valid JSON"),
        ('{"weight_map": {"model.norm.weight": 3}}', "not a \\*.safetensors file name"),
    ],
    ids=["no_weight_map", "not_json", "bad_entry"],
)
def test_broken_index_is_named(tmp_path, content, match):
    src = _copy(SHARDED, tmp_path)
    (src / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match=match) as err:
        dsv3_jax.load_hf_checkpoint(src)
    assert str(src / INDEX) in str(err.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{broken", "config.json is not valid JSON"),
        ("[1, 2]", "config.json is not a JSON object"),
        ('{"model_type": "llama"}', "config.json: config.json model_type 'llama'"),
        ('{"quantization_config": {"quant_method": "gptq"}}', "config.json: unsupported"),
    ],
    ids=["not_json", "not_object", "wrong_model", "quant"],
)
def test_broken_config_is_named(tmp_path, content, match):
    src = _copy(SINGLE, tmp_path)
    (src / "config.json").write_text(content)
    for call in (
        lambda: dsv3_jax.load_hf_checkpoint(src),
        lambda: convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False),
    ):
        with pytest.raises(CheckpointError, match=match) as err:
            call()
        assert str(src / "config.json") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_shard_names_index_and_shard(tmp_path):
    src = _copy(SHARDED, tmp_path)
    (src / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        dsv3_jax.load_hf_checkpoint(src)
    msg = str(err.value)
    assert str(src / INDEX) in msg and "['model-00003-of-00005.safetensors']" in msg
    assert " -> model-00003-of-00005.safetensors" in msg  # a tensor it should hold


# ----------------------------------------------------------------------------- 5. outputs
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    convert_hf.hf_to_orbax(SINGLE, root / "orbax", dtype="float32", progress=False)
    return root / "orbax"


def _overlaps(src, tmp_path):
    """(output, expected reason) pairs that overlap ``src`` in every spelling."""
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    rel = os.path.relpath(src)
    return [
        (src, "is the input"),
        (str(src) + "/", "is the input"),
        (link, "is the input"),
        (rel, "is the input"),
        (src / "sub", "is inside the input"),
        (link / "sub" / "deeper", "is inside the input"),
        (src.parent, "contains the input"),
    ]


def test_hf_to_orbax_refuses_its_input(tmp_path):
    src = _copy(SINGLE, tmp_path)
    before = _listing(src)
    for out, why in _overlaps(src, tmp_path):
        with pytest.raises(ValueError, match=why):
            convert_hf.hf_to_orbax(src, out, overwrite=True, progress=False)
        assert _listing(src) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "src"]
    with pytest.raises(ValueError, match="is the input"):  # src given as its config.json
        convert_hf.hf_to_orbax(src / "config.json", src, overwrite=True, progress=False)


def test_orbax_to_hf_refuses_its_input(converted, tmp_path):
    before = _listing(converted)
    for out, why in _overlaps(converted, tmp_path):
        if why == "contains the input":
            continue  # the module fixture's parent is shared; checked below on a copy
        with pytest.raises(ValueError, match=why):
            convert_hf.orbax_to_hf(converted, out, overwrite=True, progress=False)
        assert _listing(converted) == before
    copy = _copy(converted, tmp_path, "inner")
    with pytest.raises(ValueError, match="contains the input"):
        convert_hf.orbax_to_hf(copy, tmp_path, overwrite=True, progress=False)
    assert (copy / "meta.json").exists()


@pytest.mark.parametrize("command", ["hf_to_orbax", "orbax_to_hf"])
def test_convert_cli_refuses_its_input(command, converted, tmp_path, cli_env):
    src = _copy(SINGLE if command == "hf_to_orbax" else converted, tmp_path)
    flag = "--hf_dir" if command == "hf_to_orbax" else "--checkpoint_dir"
    before = _listing(tmp_path)
    r = run_script(
        ["convert.py", command, f"{flag}={src}", f"--output_dir={src}/", "--overwrite"], cli_env
    )
    line = _one_error_line(r)
    assert f"output {src}/ is the input {src}" in line, line
    assert _listing(tmp_path) == before


def test_overwrite_replaces_only_a_conversion_output(converted, tmp_path, cli_env, monkeypatch):
    """An empty --output_dir (an unset shell variable) or a folder of the user's is never replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    before = _listing(tmp_path)
    monkeypatch.chdir(mine)
    for out in ("", " "):
        with pytest.raises(ValueError, match=r"output folder \(--output_dir\) is empty"):
            convert_hf.hf_to_orbax(SINGLE, out, overwrite=True, progress=False)
    with pytest.raises(FileExistsError, match="is not a hf_to_orbax output folder"):
        convert_hf.hf_to_orbax(SINGLE, mine, overwrite=True, progress=False)
    with pytest.raises(FileExistsError, match="is not a HF checkpoint folder"):
        convert_hf.orbax_to_hf(converted, mine, overwrite=True, progress=False)
    assert _listing(tmp_path) == before
    convert_py = GOLDENS.parent.parent / "convert.py"
    r = subprocess.run(  # from inside the user's folder, as `--output_dir=$UNSET` would be
        [sys.executable, convert_py, "hf_to_orbax", f"--hf_dir={SINGLE}", "--output_dir=",
         "--overwrite"],
        cwd=mine, env=cli_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert "--output_dir" in _one_error_line(r)
    assert _listing(tmp_path) == before
    # An earlier conversion's output and an empty folder are replaced.
    again = tmp_path / "again"
    convert_hf.hf_to_orbax(SINGLE, again, dtype="float32", progress=False)
    convert_hf.hf_to_orbax(SINGLE, again, dtype="float32", overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    convert_hf.orbax_to_hf(again, tmp_path / "empty", overwrite=True, progress=False)
    convert_hf.orbax_to_hf(again, tmp_path / "empty", overwrite=True, progress=False)
    assert (tmp_path / "empty" / "config.json").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_are_removed_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "out"
    host = convert_hf._HOST
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    folders = {
        "dead": f"out.tmp-{host}-{_dead_pid()}-abcd_123",
        "live": f"out.tmp-{host}-{sleeper.pid}-ijkl_789",
        "other_host": f"out.tmp-not-{host}x-{_dead_pid()}-mnop_012",
        "legacy": "out.tmp-qrst_345",
        "other_out": f"out2.tmp-{host}-{_dead_pid()}-uvwx_678",
    }
    try:
        for name in folders.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "shard").write_bytes(b"x" * 1000)
        with caplog.at_level(logging.INFO, logger="dsv3_jax"):
            convert_hf.hf_to_orbax(SINGLE, out, dtype="float32", progress=False)
            # An .old- folder of a dead run is removed once `out` exists (see the next test).
            folders["dead_old"] = f"out.old-{host}-{_dead_pid()}-efgh_456"
            (tmp_path / folders["dead_old"]).mkdir()
            convert_hf.hf_to_orbax(SINGLE, out, dtype="float32", overwrite=True, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    kept = [folders[k] for k in ("live", "other_host", "legacy", "other_out")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])
    text = caplog.text
    assert f"removed {tmp_path / folders['dead']} (0.00 GB)" in text
    assert f"removed {tmp_path / folders['dead_old']}" in text
    assert f"kept {tmp_path / folders['live']} (0.00 GB)" in text
    assert f"pid {sleeper.pid} is alive" in text and f"written from host not-{host}x" in text
    assert f"kept {tmp_path / folders['legacy']}" in text and "not named by this version" in text
    assert "out2" not in text
    model, _ = dsv3_jax.load_checkpoint(out)
    got, want = _golden_logits(model, SINGLE)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)


def test_old_folder_without_output_is_kept(tmp_path, caplog):
    """A run killed between moving the old output aside and renaming the new one in: the old
    folder holds the user's previous output and must survive the next run."""
    old = tmp_path / f"out.old-{convert_hf._HOST}-{_dead_pid()}-abcd_123"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="dsv3_jax"):
        convert_hf.hf_to_orbax(SINGLE, tmp_path / "out", dtype="float32", progress=False)
    assert (old / "meta.json").read_text() == "{}"
    assert f"kept {old}" in caplog.text and "previous out" in caplog.text


def test_shared_conversion_gives_golden_logits(converted):
    """The module's shared conversion (used above) is a real one: golden logits."""
    model, meta = dsv3_jax.load_checkpoint(converted, dtype=jnp.float32)
    assert meta["dtype"] == "float32"
    got, want = _golden_logits(model, SINGLE)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)
