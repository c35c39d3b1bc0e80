"""FP8 inference (issue 11): ``load_hf_checkpoint(..., fp8=True)`` and ``load_checkpoint(...,
fp8=True)`` keep the official FP8 weights as float8_e4m3fn + float32 scales in device memory and
run every projection as an FP8 GEMM; compared with the dequantised float model.

Checkpoint: the official-layout FP8 checkpoint of tests/goldens/fp8_checkpoint.py (conftest
``fp8_dir``): 128 x 128 blocks with partial edge blocks, scales in other shards than their weights,
an MTP layer, bf16 embedding / head / norms / router / eh_proj. References: its stored bytes, the
float model (``load_hf_checkpoint`` without fp8, whose logits match transformers, test_convert.py)
and ``fp8.quantize_np``.

This random checkpoint is very sensitive: relative noise of 2.5% on its float weights moves its
logits by 31% (RMS), and 1% by 11%. FP8 activations (e4m3 keeps 3 mantissa bits: each
activation rounded by up to 2^-4 relative) change each projection by about 2.5% (RMS), so the
FP8 model's logits differ from the float model's by 24-40% (RMS), and greedy decoding parts
from the float model's at the first near-tie (see the tests for the numbers).
"""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import GOLDENS, load_safetensors, run_script
from flax import nnx
from safetensors.numpy import save_file

import dsv3_jax
from dsv3_jax import convert_hf, fp8, hf_io, layers
from dsv3_jax.model import with_implementation

sys.path.insert(0, str(GOLDENS))
import fp8_checkpoint  # noqa: E402

FP8 = ml_dtypes.float8_e4m3fn
FP8_GOLDEN = GOLDENS / "fp8_official.npz"


@pytest.fixture(scope="module")
def keep_dir(fp8_dir, tmp_path_factory):
    """``fp8_dir`` converted with --keep_fp8 (FP8 kernels as stored, the rest bfloat16)."""
    out = tmp_path_factory.mktemp("keep") / "keep"
    convert_hf.hf_to_orbax(fp8_dir, out, keep_fp8=True, progress=False)
    return out


@pytest.fixture(scope="module")
def models(fp8_dir, keep_dir):
    """The FP8 model from both loaders (float32 for the rest) and the dequantised float model."""
    return {
        "hf": dsv3_jax.load_hf_checkpoint(fp8_dir, fp8=True),
        "keep_fp8": dsv3_jax.load_checkpoint(keep_dir, dtype=jnp.float32, fp8=True)[0],
        "float": dsv3_jax.load_hf_checkpoint(fp8_dir),
    }


def _flat(model) -> dict[tuple, jax.Array]:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _nbytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def _stored(model) -> dict[str, tuple[jax.Array, jax.Array]]:
    """HF FP8 weight name -> (our kernel [in, out], its scale_inv): every kind of place a kernel
    sits in (dense and MoE layer stacks, routed expert stacks, shared experts, the MTP layer)."""
    dense, moe, mtp = model.dense_layers, model.moe_layers, model.mtp[0].block

    def lin(layer, *index):
        return layer.kernel[...][index], layer.kernel_scale_inv[...][index]

    return {
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": lin(
            dense.self_attn.kv_a_proj_with_mqa, 0
        ),  # [152, 160]: partial blocks both ways
        "model.layers.0.mlp.down_proj.weight": lin(dense.mlp.down_proj, 0),
        "model.layers.1.self_attn.o_proj.weight": lin(moe.self_attn.o_proj, 0),
        "model.layers.1.mlp.shared_experts.up_proj.weight": lin(moe.mlp.shared_experts.up_proj, 0),
        "model.layers.1.mlp.experts.3.up_proj.weight": (
            moe.mlp.up_proj[...][0, 3],
            moe.mlp.up_proj_scale_inv[...][0, 3],
        ),
        "model.layers.2.self_attn.q_b_proj.weight": lin(mtp.self_attn.q_b_proj),
        "model.layers.2.mlp.experts.1.down_proj.weight": (
            mtp.mlp.down_proj[...][1],
            mtp.mlp.down_proj_scale_inv[...][1],
        ),
    }


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("loader", ["hf", "keep_fp8"])
def test_fp8_model_holds_the_stored_bytes_and_scales(models, loader):
    """Both loaders: each FP8 kernel is the stored FP8 weight's bytes transposed (stacks
    included), its scale the stored grid transposed; all FP8 bytes of the files are in the model
    (byte histograms equal: nothing requantised); every other parameter is the float model's."""
    model, ref = models[loader], _flat(models["float"])
    assert model.config.fp8_weights
    t = fp8_checkpoint.tensors()
    for name, (kernel, scale) in _stored(model).items():
        assert kernel.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32, name
        assert np.asarray(kernel).T.view(np.uint8).tobytes() == t[name].view(np.uint8).tobytes()
        np.testing.assert_array_equal(np.asarray(scale).T, t[name + "_scale_inv"], err_msg=name)

    flat = _flat(model)
    scale_of = layers.fp8_scale_paths(dict(nnx.to_flat_state(nnx.state(model))))
    assert set(flat) == set(ref) | set(scale_of.values())
    for p in ref:
        if p in scale_of:
            assert flat[p].dtype == jnp.float8_e4m3fn, p
            assert flat[scale_of[p]].dtype == jnp.float32, p
        else:
            np.testing.assert_array_equal(np.asarray(flat[p]), np.asarray(ref[p]), err_msg=str(p))
    in_model = sum(
        np.bincount(np.asarray(flat[p]).view(np.uint8).ravel(), minlength=256)
        for p in scale_of
        if p != ("mtp", 0, "eh_proj", "kernel")  # bf16 in the files: quantised on load
    )
    in_files = sum(np.bincount(x.view(np.uint8).ravel(), minlength=256) for x in t.values()
                   if x.dtype == FP8)  # fmt: skip
    np.testing.assert_array_equal(in_model, in_files)


def test_weights_stored_in_float_are_quantized_on_load(models, fp8_converted):
    """A kernel stored in float where the FP8 model wants FP8 is ``fp8.quantize_np`` of it, in
    our [in, out] layout: the bf16 eh_proj of the HF folder, and every kernel of a folder
    converted without --keep_fp8 (float32), whose FP8 values and scales then differ from the
    stored ones where a block's amax was not 448 x its scale (amax / 448 rescales the block)."""
    t = fp8_checkpoint.tensors()
    eh = models["hf"].mtp[0].eh_proj
    q, s = fp8.quantize_np(t["model.layers.2.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(eh.kernel[...]).view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(eh.kernel_scale_inv[...]), s)

    # fp8=True serves a run trained with fp8_training too (the flag is turned off, not refused)
    model, _ = dsv3_jax.load_checkpoint(fp8_converted, fp8=True, fp8_training=True)
    assert model.config.fp8_weights and not model.config.fp8_training
    floats = _flat(dsv3_jax.load_checkpoint(fp8_converted)[0])
    flat = _flat(model)
    for p, sp in layers.fp8_scale_paths(dict(nnx.to_flat_state(nnx.state(model)))).items():
        x = np.asarray(floats[p])
        q, s = fp8.quantize_np(x.reshape(-1, *x.shape[-2:]))
        np.testing.assert_array_equal(
            np.asarray(flat[p]).view(np.uint8), q.view(np.uint8).reshape(x.shape), err_msg=str(p)
        )
        np.testing.assert_array_equal(np.asarray(flat[sp]), s.reshape(flat[sp].shape))


def test_fp8_weights_take_about_half_the_memory_of_bf16(keep_dir):
    """Device memory of the weights (nbytes of the model state) for the --keep_fp8 folder loaded
    as saved (bfloat16 for what is not FP8): FP8 1,318,064 bytes, bf16 2,432,560 (0.54); FP8
    values are 1 byte against 2, plus a float32 scale per 128 x 128 block; embedding, head,
    norms and router (about 0.2 MB here) stay bf16 (router float32)."""
    fp8_model, _ = dsv3_jax.load_checkpoint(keep_dir, fp8=True)
    bf16_model, _ = dsv3_jax.load_checkpoint(keep_dir)
    assert bf16_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    got, bf16 = _nbytes(fp8_model), _nbytes(bf16_model)
    assert (got, bf16) == (1_318_064, 2_432_560)
    assert 0.5 < got / bf16 < 0.6


# ----------------------------------------------------------------------------- numerics
def test_each_fp8_projection_is_within_the_activation_rounding_bound(models):
    """One FP8 projection (``layers.product`` with a scale: activations quantised in 1 x 128
    tiles, ``fp8.gemm``) against float64 x @ W with W the dequantised FP8 weight: since W is exact
    in both, only the activations' rounding counts, |q(x) - x| <= 2^-4 |x| + 2^-10 s (s: the
    tile's scale, 2^-10 s the e4m3 subnormals' half step), so per output
    |y - y_ref| <= sum_k (2^-4 |x_k| + 2^-10 s_k) |W_kj| (+ 1e-5 relative for float32 sums).
    Every FP8 kernel of the model, partial blocks and K < 128 (o_proj: 80) included."""
    model = models["hf"]
    rng = np.random.default_rng(0)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    product = jax.jit(lambda x, k, s: layers.product(x, k, model.config, scale_inv=s))
    for p, sp in layers.fp8_scale_paths(flat).items():
        kernel, scale = flat[p].get_value(), flat[sp].get_value()
        kernel = kernel.reshape(-1, *kernel.shape[-2:])[-1]  # one [in, out] matrix per stack
        scale = scale.reshape(-1, *scale.shape[-2:])[-1]
        x = rng.standard_normal((9, kernel.shape[0])) * np.exp(rng.uniform(-4, 4, (9, 1)))
        x = x.astype(np.float32)
        w = fp8.dequantize_np(np.asarray(kernel), np.asarray(scale)).astype(np.float64)
        got = np.asarray(product(x, kernel, scale), np.float64)
        xs = np.repeat(np.asarray(fp8.quantize(x, fp8.ACT_BLOCK)[1]), 128, axis=1)
        bound = (2**-4 * np.abs(x) + 2**-10 * xs[:, : x.shape[1]]) @ np.abs(w)
        bound += 1e-5 * np.abs(x) @ np.abs(w)
        err = np.abs(got - x.astype(np.float64) @ w)
        assert (err <= bound).all(), (p, float((err / bound).max()))
        rel = np.sqrt((err**2).mean() / ((x.astype(np.float64) @ w) ** 2).mean())
        assert rel < 0.04, (p, rel)  # about 0.025 measured: activations round by 2^-4 at most


@pytest.fixture(scope="module")
def greedy(models):
    """32 greedy tokens after each of the golden's two prompts from the float model (``want``)
    and from the FP8 model (``got``, decoded with ``mla_decode="naive"``: see the test), and the
    logits [2, 32, w] at the positions that chose them: ``ref`` (float model on ``want``),
    ``fp8_on_ref`` (FP8 model on ``want``), ``own`` (FP8 model on ``got``)."""
    fp8_model, float_model = models["hf"], models["float"]
    ids = np.load(FP8_GOLDEN)["input_ids"]
    s, n = ids.shape[1], 32
    naive = with_implementation(nnx.merge(*nnx.split(fp8_model)), mla_decode="naive")
    got = np.asarray(dsv3_jax.generate(naive, ids, n))
    want = np.asarray(dsv3_jax.generate(float_model, ids, n))
    forward = nnx.jit(lambda model, x: model(x)[:, s - 1 :])  # one compile per model
    return {
        "s": s,
        "got": got,
        "want": want,
        "ref": np.asarray(forward(float_model, want[:, :-1])),
        "fp8_on_ref": np.asarray(forward(fp8_model, want[:, :-1])),
        "own": np.asarray(forward(fp8_model, got[:, :-1])),
    }


def test_fp8_logits_match_float_within_tolerance(greedy):
    """Logits of the FP8 model against the float model (which matches transformers to 6e-5) on
    the float model's greedy sequences (2 x 32 positions; logits std 2.5, max |logit| 11.5).
    Measured: relative RMS error 0.40, max |error| 9.9, top-1 agreement 40 / 64 (0.24 and 22 / 26
    on the golden's 2 x 13 prompt positions). Tolerance: relative RMS < 0.5 and top-1
    agreement >= 0.55: this checkpoint amplifies the ~2.5% per-projection error (bounded per
    projection by the test above) about tenfold (module docstring). A gross fault fails it:
    scale grids flipped give 1.30 and 0 / 26 (a 6% error in one projection does not: the
    byte-exact tests above are the ones for that)."""
    want, got = greedy["ref"], greedy["fp8_on_ref"]
    err = got - want
    rel = float(np.sqrt((err**2).mean() / (want**2).mean()))
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert rel < 0.5 and agree >= 0.55, (rel, agree, float(np.abs(err).max()))


def test_fp8_greedy_tokens_follow_float_until_a_near_tie(greedy):
    """32 greedy tokens after each of the golden's two prompts, FP8 model against float model.

    They cannot stay equal for 32 tokens on this checkpoint: the FP8 model's largest logit error
    is about 2 at a typical position (median; up to 9.9), the float model's top-2 margin about
    0.6 (median; a random model over a 300-token vocabulary). Measured: the rows part at new
    token 0 (float top-2 margin 0.13) and at new token 2 (margin 2.79; with the absorbed decode,
    at tokens 0 and 9, margins 0.13 and 0.04); the FP8 error bound B, the largest |FP8 - float|
    logit over every position of the float model's two sequences, is 9.9. So the test checks
    what must hold instead:
    - FP8 decoding over the latent cache is the FP8 model: each FP8 token is the argmax of the FP8
      model's full forward on its prefix (decoded with ``mla_decode="naive"``, whose kv_b runs
      through the FP8 GEMM as in the forward; the default absorbed form uses kv_b dequantised,
      DeepSeek's absorb mode, which skips one activation rounding and so picks other tokens
      at near-ties here);
    - up to the first divergence the tokens are equal (by definition), and there the float
      model's top-2 margin is below 2B (each of the two logits moved by at most B), and the FP8
      token is within 2B of the float model's best logit (a near-tie, not a wrong token).
    """
    s, got, want, ref = greedy["s"], greedy["got"], greedy["want"], greedy["ref"]
    np.testing.assert_array_equal(greedy["own"].argmax(-1), got[:, s:])
    bound = float(np.abs(greedy["fp8_on_ref"] - ref).max())
    for row in range(len(got)):
        differ = np.flatnonzero(got[row, s:] != want[row, s:])
        if not differ.size:
            continue  # 32 equal tokens
        i = differ[0]
        top2 = np.sort(ref[row, i])[-2:]
        assert top2[1] - top2[0] < 2 * bound, (row, i, top2, bound)
        assert ref[row, i, got[row, s + i]] > top2[1] - 2 * bound, (row, i, bound)


# ----------------------------------------------------------------------------- files
def test_reading_fp8_leaves_numpy_alone(fp8_dir):
    """FP8 tensors are read from the files' bytes (safetensors' numpy reader needs
    ``np.float8_e4m3fn``, which numpy does not define): numpy is not patched, and a box read
    equals the same box of the whole tensor."""
    files = hf_io.SafetensorsDir(fp8_dir, (128, 128))
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    whole = files.read_raw(name)
    assert whole.dtype == FP8 and whole.shape == (152, 160)
    t = load_safetensors(fp8_dir / files.file_of[name])
    assert whole.tobytes() == t[name].tobytes() == fp8_checkpoint.tensors()[name].tobytes()
    box = ((100, 140), (30, 160))
    assert files._raw_box(name, box).tobytes() == whole[100:140, 30:160].tobytes()
    assert getattr(np, "float8_e4m3fn", None) is not FP8


def test_fused_fp8_experts(fp8_dir, tmp_path):
    """HF's fused experts in FP8 (``gate_up_proj`` [e, 2f, d] in one block grid; f = 136 puts
    the gate/up split inside a block): ``fp8=True`` keeps down_proj's bytes and quantises gate and
    up from the dequantised fused weight; --keep_fp8 stores the fused gate_up dequantised (its
    scale grid cannot be split; it failed to save before) and loads as the float model."""
    t = {}
    for f in sorted(fp8_dir.glob("*.safetensors")):
        t.update(load_safetensors(f))
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts."

        def deq(name):
            return fp8.dequantize_np(t.pop(name), t.pop(name + "_scale_inv"))

        fused = {
            "gate_up_proj": np.stack(
                [
                    np.concatenate([deq(f"{p}{e}.gate_proj.weight"), deq(f"{p}{e}.up_proj.weight")])
                    for e in range(4)
                ]
            ),  # fmt: skip
            "down_proj": np.stack([deq(f"{p}{e}.down_proj.weight") for e in range(4)]),
        }
        for name, x in fused.items():
            t[p + name], t[p + name + "_scale_inv"] = fp8.quantize_np(x)
    src = tmp_path / "fused"
    src.mkdir()
    save_file(t, src / "model.safetensors")
    (src / "config.json").write_bytes((fp8_dir / "config.json").read_bytes())

    model = dsv3_jax.load_hf_checkpoint(src, fp8=True)
    dn = t["model.layers.1.mlp.experts.down_proj"]
    got = np.asarray(model.moe_layers.mlp.down_proj[...])[0]
    assert got.tobytes() == np.ascontiguousarray(dn.transpose(0, 2, 1)).tobytes()
    gate = fp8.dequantize_np(
        t["model.layers.1.mlp.experts.gate_up_proj"],
        t["model.layers.1.mlp.experts.gate_up_proj_scale_inv"],
    )[:, :136].transpose(0, 2, 1)
    q, s = fp8.quantize_np(gate)
    assert np.asarray(model.moe_layers.mlp.gate_proj[...])[0].tobytes() == q.tobytes()
    np.testing.assert_array_equal(np.asarray(model.moe_layers.mlp.gate_proj_scale_inv[...])[0], s)

    convert_hf.hf_to_orbax(src, tmp_path / "keep", keep_fp8=True, dtype="float32", progress=False)
    want = _flat(dsv3_jax.load_hf_checkpoint(src))
    got = _flat(dsv3_jax.load_checkpoint(tmp_path / "keep")[0])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=str(p))


def test_fp8_model_cannot_be_saved_as_hf_yet(models, tmp_path):
    with pytest.raises(NotImplementedError, match="fp8_weights=True"):
        convert_hf.save_hf(models["hf"], tmp_path / "out", progress=False)


@pytest.mark.slow
def test_sample_cli_fp8_prints_the_weights_memory(keep_dir, cli_env):
    """``sample.py --fp8 --verbose`` on the --keep_fp8 folder: it samples (single characters
    are ids below this checkpoint's 300) and prints the weights' device memory, the FP8 model's
    nbytes (about half the bf16 model's, test above)."""
    r = run_script(
        ["sample.py", f"--checkpoint={keep_dir}", "--fp8", "--verbose", "--prompt=a",
         "--max_new_tokens=8"],
        cli_env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("a")
    line = next(x for x in r.stderr.splitlines() if x.startswith("[weights: "))
    assert line.startswith("[weights: 1,318,064 bytes"), line
    assert "float8_e4m3fn" in line and "bfloat16" in line, line
