"""convert.py / dsv3_jax.convert_hf: official FP8 layout to orbax and back, against references.

References: tests/goldens/fp8_official.npz holds transformers' logits on the checkpoint that
tests/goldens/fp8_checkpoint.py builds, its FP8 weights dequantized by that module's independent
float64 routine (make_goldens.py); the float32 goldens hold transformers' logits on their files.
"""

import json
import os
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import GOLDENS, load_safetensors, tol
from safetensors.numpy import save_file

import dsv3_jax
from dsv3_jax import convert_hf
from dsv3_jax.fp8 import quantize_np
from dsv3_jax.hf_io import CheckpointError, dequantize

sys.path.insert(0, str(GOLDENS))
import fp8_checkpoint  # noqa: E402

FP8_GOLDEN = GOLDENS / "fp8_official.npz"


def _tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_safetensors(os.path.join(path, f)))
    return out


def _logits(model):
    g = np.load(FP8_GOLDEN)
    return np.asarray(model(g["input_ids"])), g["logits"]


# ----------------------------------------------------------------------------- FP8 parity
def test_fp8_checkpoint_has_partial_blocks_and_split_shards(fp8_dir):
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    t = _tensors(fp8_dir)
    assert t[kv].dtype == ml_dtypes.float8_e4m3fn and t[kv].shape == (152, 160)
    assert t[kv + "_scale_inv"].shape == (2, 2)  # 152 = 128 + 24 rows, 160 = 128 + 32 cols
    assert index[kv] != index[kv + "_scale_inv"]
    assert any(k.startswith("model.layers.2.") for k in index)  # MTP at num_hidden_layers


def test_converted_fp8_logits_match_transformers(fp8_converted):
    model, meta = dsv3_jax.load_checkpoint(fp8_converted, dtype=jnp.float32)
    assert meta["step"] == 0 and meta["vocab"] is None and model.num_mtp == 1
    got, want = _logits(model)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)


def test_converted_fp8_weights_equal_float64_reference(fp8_converted):
    """Every weight, MTP included, equals the independent float64 dequantisation (as float32)."""
    model, _ = dsv3_jax.load_checkpoint(fp8_converted, dtype=jnp.float32)
    ref = fp8_checkpoint.dequantized()
    moe, mtp = model.moe_layers, model.mtp[0]
    checks = {
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": moe.self_attn.kv_a_proj_with_mqa.kernel[
            ...
        ][0].T,
        "model.layers.0.mlp.down_proj.weight": model.dense_layers.mlp.down_proj.kernel[...][0].T,
        "model.layers.1.mlp.experts.3.up_proj.weight": moe.mlp.up_proj[...][0, 3].T,
        "model.layers.2.self_attn.q_b_proj.weight": mtp.block.self_attn.q_b_proj.kernel[...].T,
        "model.layers.2.mlp.experts.1.down_proj.weight": mtp.block.mlp.down_proj[...][1].T,
        "model.layers.2.eh_proj.weight": mtp.eh_proj.kernel[...].T,
        "model.layers.2.mlp.gate.e_score_correction_bias": mtp.block.mlp.gate.e_score_correction_bias[
            ...
        ],
    }
    for name, got in checks.items():
        np.testing.assert_array_equal(np.asarray(got), ref[name].astype(np.float32), err_msg=name)


def test_load_hf_checkpoint_reads_official_fp8_directly(fp8_dir):
    model = dsv3_jax.load_hf_checkpoint(fp8_dir)
    got, want = _logits(model)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)


def test_keep_fp8_stores_fp8_and_runs(fp8_dir, tmp_path):
    keep, bf16 = tmp_path / "keep", tmp_path / "bf16"
    convert_hf.hf_to_orbax(fp8_dir, keep, keep_fp8=True, progress=False)
    convert_hf.hf_to_orbax(fp8_dir, bf16, dtype="bfloat16", progress=False)
    meta = ocp.StandardCheckpointer().metadata(str(keep / "model" / "layer_001")).item_metadata
    experts = meta.tree["mlp"]["up_proj"]
    assert experts.dtype == ml_dtypes.float8_e4m3fn and tuple(experts.shape) == (4, 160, 136)
    assert tuple(meta.tree["mlp"]["up_proj_scale_inv"].shape) == (4, 2, 2)

    def weight_bytes(path):
        return sum(
            convert_hf._group_bytes(ocp.StandardCheckpointer(), str(path / "model" / g))
            for g in json.loads((path / "meta.json").read_text())["groups"]
        )

    assert weight_bytes(keep) < 0.6 * weight_bytes(bf16)
    model, _ = dsv3_jax.load_checkpoint(keep, dtype=jnp.float32)
    got, want = _logits(model)
    np.testing.assert_allclose(got, want, atol=tol("float32"), rtol=0)


def test_keep_fp8_round_trip_is_bit_exact(fp8_dir, tmp_path):
    convert_hf.hf_to_orbax(fp8_dir, tmp_path / "keep", keep_fp8=True, progress=False)
    convert_hf.orbax_to_hf(tmp_path / "keep", tmp_path / "hf", fp8=True, progress=False)
    a, b = _tensors(fp8_dir), _tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]


def test_bf16_conversion_is_close(fp8_dir, tmp_path):
    convert_hf.hf_to_orbax(fp8_dir, tmp_path / "bf16", progress=False)
    model, meta = dsv3_jax.load_checkpoint(tmp_path / "bf16")
    assert meta["dtype"] == "bfloat16"
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert model.moe_layers.mlp.gate.kernel[...].dtype == jnp.float32
    got, want = _logits(model)
    assert np.median(np.abs(got - want)) < 0.05 * np.abs(want).mean()


def test_drop_mtp(fp8_dir, tmp_path):
    convert_hf.hf_to_orbax(fp8_dir, tmp_path / "o", dtype="float32", drop_mtp=True, progress=False)
    assert not (tmp_path / "o" / "model" / "layer_002").exists()
    model, meta = dsv3_jax.load_checkpoint(tmp_path / "o")
    assert model.num_mtp == 0 and meta["mtp"] is False


def test_quantize_dequantize_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 200)) * np.exp(rng.uniform(-3, 3, (300, 1)))
    q, s = quantize_np(w, (128, 128))
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize(q, s, (128, 128)).astype(np.float64)
    ref = fp8_checkpoint.dequantize_f64(q, s)
    np.testing.assert_array_equal(back, ref.astype(np.float32))
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative); subnormals below 2^-6 x scale.
    big = np.repeat(np.repeat(s, 128, 0)[:300], 128, 1)[:, :200]
    assert (np.abs(back - w) <= 2**-4 * np.abs(w) + 2**-10 * big).all()


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "name", ["a_qlora_yarn_sharded_mtp", "b_qproj_vdim_dense2_nonorm", "d_yarn_mscale_official_cfg"]
)
def test_float32_round_trip_is_bit_exact(name, tmp_path):
    """HF -> orbax -> HF: every tensor's bytes; with the goldens' transformers logits on the same
    files, the round-tripped directory gives transformers' logits."""
    src = GOLDENS / name
    convert_hf.hf_to_orbax(src, tmp_path / "o", dtype="float32", progress=False)
    r = convert_hf.orbax_to_hf(
        tmp_path / "o", tmp_path / "hf", max_shard_size="40KB", progress=False
    )
    assert r["shards"] > 1
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    assert all(
        os.path.getsize(tmp_path / "hf" / f) < 60_000 for f in set(index["weight_map"].values())
    )
    cfg_a = dsv3_jax.ModelConfig.from_hf(src)
    cfg_b = dsv3_jax.ModelConfig.from_hf(tmp_path / "hf")
    assert cfg_a == cfg_b
    # Outputs get a plain mkdir/open's modes (not the private modes of their temporary folder).
    mask = os.umask(0)
    os.umask(mask)
    for out in (tmp_path / "o", tmp_path / "hf"):
        for path in [out, *out.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert path.stat().st_mode & 0o777 == want, path


def test_round_tripped_directory_gives_golden_logits(tmp_path):
    src = GOLDENS / "a_qlora_yarn_sharded_mtp"
    convert_hf.hf_to_orbax(src, tmp_path / "o", dtype="float32", progress=False)
    convert_hf.orbax_to_hf(tmp_path / "o", tmp_path / "hf", progress=False)
    g = np.load(src / "golden.npz")
    model = dsv3_jax.load_hf_checkpoint(tmp_path / "hf")
    assert model.num_mtp == 1
    np.testing.assert_allclose(
        np.asarray(model(g["input_ids"])), g["logits"], atol=tol("float32"), rtol=0
    )


def test_fp8_export_of_a_float_checkpoint_loads(tmp_path):
    src = GOLDENS / "f_v3_like"
    convert_hf.hf_to_orbax(src, tmp_path / "o", dtype="float32", progress=False)
    convert_hf.orbax_to_hf(tmp_path / "o", tmp_path / "hf", fp8=True, progress=False)
    t = _tensors(tmp_path / "hf")
    q = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert t[q].dtype == ml_dtypes.float8_e4m3fn and q + "_scale_inv" in t
    assert t["model.layers.1.mlp.gate.weight"].dtype == np.float32  # router not quantized
    ref = _tensors(src)
    np.testing.assert_allclose(
        dequantize(t[q], t[q + "_scale_inv"], (128, 128)), ref[q], rtol=2**-4, atol=1e-3
    )
    assert dsv3_jax.load_hf_checkpoint(tmp_path / "hf").num_mtp == 0


# ----------------------------------------------------------------------------- errors
def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]


def _copy_fp8(fp8_dir, tmp_path):
    import shutil

    dst = tmp_path / "src"
    shutil.copytree(fp8_dir, dst)
    return dst


def _rewrite(path, fname, fn):
    t = load_safetensors(path / fname)
    fn(t)
    save_file(t, path / fname)


def test_existing_output_is_refused_then_overwritten(fp8_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hf.hf_to_orbax(fp8_dir, out, progress=False)
    # --overwrite replaces an earlier conversion's output, never a folder of the user's.
    with pytest.raises(FileExistsError, match="is not a hf_to_orbax output folder"):
        convert_hf.hf_to_orbax(fp8_dir, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is replaced
    convert_hf.hf_to_orbax(fp8_dir, out, dtype="float32", drop_mtp=True, progress=False,
                           overwrite=True)  # fmt: skip
    (out / "extra.txt").write_text("left by a user in the output")
    convert_hf.hf_to_orbax(
        fp8_dir, out, dtype="float32", drop_mtp=True, overwrite=True, progress=False
    )
    assert not (out / "extra.txt").exists() and (out / "meta.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_shard_file(fp8_dir, tmp_path):
    src = _copy_fp8(fp8_dir, tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_truncated_or_corrupt_file(fp8_dir, tmp_path, damage):
    src = _copy_fp8(fp8_dir, tmp_path)
    f = src / "model-00001-of-00002.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{not json" + data[17:]
    )
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_missing_and_unexpected_tensors_listed_together(fp8_dir, tmp_path):
    src = _copy_fp8(fp8_dir, tmp_path)
    gone = ["model.layers.1.mlp.experts.2.up_proj.weight", "model.norm.weight"]

    def edit(t):
        for n in gone:
            t.pop(n)
            t.pop(n + "_scale_inv", None)
        t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)

    _rewrite(src, "model-00001-of-00002.safetensors", edit)
    _rewrite(src, "model-00002-of-00002.safetensors", lambda t: t.pop(gone[0] + "_scale_inv"))
    with pytest.raises(CheckpointError) as err:
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert all(n in msg for n in gone) and "model.layers.0.mlp.extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg
    _assert_nothing_written(tmp_path / "out")


def test_fp8_without_scale_and_scale_without_tensor(fp8_dir, tmp_path):
    src = _copy_fp8(fp8_dir, tmp_path)
    w = "model.layers.1.self_attn.o_proj.weight"

    def edit(t):
        t.pop(w + "_scale_inv")  # in shard 2: an FP8 weight with no scale
        t["model.layers.1.self_attn.ghost.weight_scale_inv"] = np.ones((1, 1), np.float32)

    _rewrite(src, "model-00002-of-00002.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert f"without a _scale_inv (1): ['{w}']" in msg
    assert (
        "scales without their tensor (1): ['model.layers.1.self_attn.ghost.weight_scale_inv']"
        in msg
    )


def test_shape_mismatches_name_both_shapes(fp8_dir, tmp_path):
    src = _copy_fp8(fp8_dir, tmp_path)
    w = "model.layers.1.self_attn.kv_b_proj.weight"

    def edit(t):
        t[w + "_scale_inv"] = np.ones((3, 2), np.float32)  # needs (2, 2) for [144, 136]

    _rewrite(src, "model-00002-of-00002.safetensors", edit)
    _rewrite(
        src,
        "model-00001-of-00002.safetensors",
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]}),
    )
    with pytest.raises(CheckpointError) as err:
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "(3, 2)" in msg and "(2, 2)" in msg and "(144, 136)" in msg
    assert "model.norm.weight" in msg and "(159,)" in msg and "(160,)" in msg


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "bitsandbytes_4bit"}, "quant_method 'bitsandbytes_4bit'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"scale shape mismatch"),
    ],
)
def test_unsupported_quantization(fp8_dir, tmp_path, qc, match):
    src = _copy_fp8(fp8_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        convert_hf.hf_to_orbax(src, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_parse_size():
    assert convert_hf.parse_size("5GB") == 5 * 10**9
    assert convert_hf.parse_size("500MB") == 5 * 10**8
    assert convert_hf.parse_size("2GiB") == 2 * 2**30
    assert convert_hf.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="5 gigs"):
        convert_hf.parse_size("5 gigs")


def test_failure_mid_conversion_leaves_nothing(fp8_dir, tmp_path, monkeypatch):
    from dsv3_jax.hf_io import SafetensorsDir

    real = SafetensorsDir.read_raw

    def flaky(self, name):
        if name.startswith("model.layers.2."):
            raise OSError(f"disk error reading {name}")
        return real(self, name)

    monkeypatch.setattr(SafetensorsDir, "read_raw", flaky)
    with pytest.raises(OSError, match="model.layers.2."):
        convert_hf.hf_to_orbax(fp8_dir, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_orbax_to_hf_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        convert_hf.orbax_to_hf(tmp_path / "empty", tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_fused_expert_names_convert(tmp_path):
    src = GOLDENS / "b_qproj_vdim_dense2_nonorm"
    t = _tensors(src)
    p = "model.layers.2.mlp.experts."
    n = 4
    gate = [t.pop(f"{p}{e}.gate_proj.weight") for e in range(n)]
    up = [t.pop(f"{p}{e}.up_proj.weight") for e in range(n)]
    t[p + "gate_up_proj"] = np.stack(
        [np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)]
    )
    t[p + "down_proj"] = np.stack([t.pop(f"{p}{e}.down_proj.weight") for e in range(n)])
    (tmp_path / "hf").mkdir()
    save_file(t, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_bytes((src / "config.json").read_bytes())
    convert_hf.hf_to_orbax(tmp_path / "hf", tmp_path / "o", dtype="float32", progress=False)
    model, _ = dsv3_jax.load_checkpoint(tmp_path / "o")
    g = np.load(src / "golden.npz")
    np.testing.assert_allclose(
        np.asarray(model(g["input_ids"])), g["logits"], atol=tol("float32"), rtol=0
    )
