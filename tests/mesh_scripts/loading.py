"""Loading onto device meshes, on 8 fake CPU devices; run by tests/test_mesh_loading.py.

Run alone: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTHONPATH=. python tests/mesh_scripts/loading.py OUT.json``. Each check runs in turn; OUT.json
maps its name to "ok" or the traceback, plus "seconds" per check. The exit status is 0 when the
script itself ran (the checks' outcomes are in OUT.json).

References, none of them the mesh code under test: HF transformers' logits (tests/goldens), the
same checkpoint loaded onto one device (each HF tensor read whole), the values saved, and the
sharding specs written out by hand from ``sharding.DEFAULT_RULES`` or from a custom table.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens"
sys.path[:0] = [str(ROOT), str(GOLDENS)]  # this checkout's dsv3_jax, not an installed one

import fp8_checkpoint  # noqa: E402

from dsv3_jax import (  # noqa: E402
    ModelConfig,
    checkpoint,
    convert_hf,
    data,
    hf_io,
    load_checkpoint,
    load_hf_checkpoint,
    train_lib,
)
from dsv3_jax.fp8 import WEIGHT_BLOCK  # noqa: E402
from dsv3_jax.fp8 import quantize as fp8_quantize  # noqa: E402
from dsv3_jax.model import DeepseekV3, abstract_model  # noqa: E402
from dsv3_jax.sharding import check_rules, logical_to_spec, make_mesh, shard_model  # noqa: E402

TOL = 1e-4  # float32 logits against HF (tests/conftest.py tol("float32"))
A = {"fsdp": 2, "tensor": 4}
B = {"data": 2, "expert": 4}
C = {"fsdp": 2, "expert": 2, "tensor": 2}


# ----------------------------------------------------------------------------- helpers
def flat_arrays(model) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def assert_rule_shardings(model, mesh, rules=None) -> None:
    """Every parameter and correction bias sits on ``mesh`` as its logical names say."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        names = var.get_metadata("out_sharding", None)
        spec = logical_to_spec(names, rules, x.shape, mesh) if names else P()
        want = NamedSharding(mesh, spec)
        assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)


def spec(x) -> P:
    return x[...].sharding.spec


def golden_logits_error(model, golden: pathlib.Path) -> float:
    g = np.load(golden)
    logits = np.asarray(model(g["input_ids"]))
    assert logits.shape == g["logits"].shape, (logits.shape, g["logits"].shape)
    return float(np.abs(logits - g["logits"]).max())


class ReadLog:
    """Stands in for ``safe_open`` in dsv3_jax.hf_io and records every tensor read (FP8 tensors,
    which hf_io reads from the files' bytes, through :meth:`fp8`).

    ``slices``: (tensor name, box ((start, stop) per dim), elements) per ``get_slice(name)[...]``;
    ``whole``: names read with ``get_tensor``.
    """

    def __init__(self):
        self.slices: list[tuple[str, tuple, int]] = []
        self.whole: list[str] = []

    def __call__(self, path, framework):
        log = self

        class File:
            def __init__(self):
                self.f = hf_io_safe_open(path, framework=framework)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                log.whole.append(name)
                return self.f.get_tensor(name)

            def get_slice(self, name):
                inner = self.f.get_slice(name)

                class Slice:
                    get_shape, get_dtype = inner.get_shape, inner.get_dtype

                    def __getitem__(self, key):
                        out = inner[key]
                        shape = inner.get_shape()
                        box = tuple(k.indices(n)[:2] for k, n in zip(key, shape, strict=True))
                        log.slices.append((name, box, int(out.size)))
                        return out

                return Slice()

        return File()

    def fp8(self, files, name, box):
        out = hf_io_fp8(files, name, box)
        if box is None:
            self.whole.append(name)
        else:
            self.slices.append((name, tuple(box), int(out.size)))
        return out

    def boxes(self, name: str) -> list[tuple]:
        return sorted(box for n, box, _ in self.slices if n == name)


hf_io_safe_open = hf_io.safe_open
hf_io_fp8 = hf_io.SafetensorsDir._fp8


@contextlib.contextmanager
def reads_logged():
    log = ReadLog()
    hf_io.safe_open = log
    hf_io.SafetensorsDir._fp8 = lambda files, name, box: log.fp8(files, name, box)
    try:
        yield log
    finally:
        hf_io.safe_open = hf_io_safe_open
        hf_io.SafetensorsDir._fp8 = hf_io_fp8


def device_boxes(x: jax.Array) -> list[tuple]:
    """The distinct (start, stop) boxes of ``x``'s shards, from jax's own index map."""
    boxes = {
        tuple(k.indices(n)[:2] for k, n in zip(index, x.shape, strict=True))
        for index in x.sharding.devices_indices_map(x.shape).values()
    }
    return sorted(boxes)


# ----------------------------------------------------------------------------- checks
def check_hf_goldens_match_on_meshes(ctx):
    """HF goldens loaded with mesh= give HF's logits on (fsdp=2, tensor=4) and (data=2,
    expert=4), the FP8 checkpoint included; every array as the rules say."""
    cases = [
        (A, GOLDENS / "a_qlora_yarn_sharded_mtp", GOLDENS / "a_qlora_yarn_sharded_mtp/golden.npz"),
        (B, GOLDENS / "c_grouped_negbias", GOLDENS / "c_grouped_negbias/golden.npz"),
        (A, ctx["fp8_dir"], GOLDENS / "fp8_official.npz"),
    ]
    errors = {}
    for axes, path, golden in cases:
        mesh = make_mesh(axes)
        model = load_hf_checkpoint(path, mesh=mesh)
        assert_rule_shardings(model, mesh)
        err = golden_logits_error(model, golden)
        errors[f"{path.name} {axes}"] = err
        assert err < TOL, (path.name, axes, err)
    return errors


def check_hf_values_and_named_specs(ctx):
    """On (fsdp=2, expert=2, tensor=2): every value equals the one-device load (whole-tensor
    reads), named parameters have the specs DEFAULT_RULES gives by hand, MTP included."""
    golden = GOLDENS / "a_qlora_yarn_sharded_mtp"
    mesh = make_mesh(C)
    model = load_hf_checkpoint(golden, mesh=mesh)
    assert_same_values(flat_arrays(model), ctx["a_single"])
    moe = model.moe_layers
    want = {
        # [l, e, d, f]: layers, experts -> expert, embed -> fsdp, expert_mlp -> tensor
        "moe gate_proj": (moe.mlp.gate_proj, P(None, "expert", "fsdp", "tensor")),
        "moe down_proj": (moe.mlp.down_proj, P(None, "expert", "tensor", "fsdp")),
        "lm_head": (model.lm_head.kernel, P("fsdp", "tensor")),  # [d, w]
        "embedding": (model.embed_tokens.embedding, P("tensor", "fsdp")),  # [w, d]
        "kv_b": (moe.self_attn.kv_b_proj.kernel, P(None, None, "tensor")),  # [l, c, h(n+v)]
        "o_proj": (moe.self_attn.o_proj.kernel, P(None, "tensor", "fsdp")),  # [l, hv, d]
        "router": (moe.mlp.gate.kernel, P(None, "fsdp")),  # [l, d, e]: router -> None
        "bias": (moe.mlp.gate.e_score_correction_bias, P()),  # [l, e]
        "mtp experts": (model.mtp[0].block.mlp.up_proj, P("expert", "fsdp", "tensor")),
        "mtp eh_proj": (model.mtp[0].eh_proj.kernel, P(None, "fsdp")),  # [2d, d]
    }
    got = {k: spec(v) for k, (v, _) in want.items()}
    assert got == {k: s for k, (_, s) in want.items()}, got
    return {k: str(v) for k, v in got.items()}


def check_reads_are_device_slices(ctx):
    """Each HF tensor element is read once, tensor by tensor (no get_tensor), each read being one
    device's shard: lm_head in its 4 distinct (vocab, embed) blocks, expert e only by the
    devices holding e, FP8 weights with only the scale blocks their slice touches."""
    golden = GOLDENS / "a_qlora_yarn_sharded_mtp"
    files = hf_io.SafetensorsDir(golden)
    mesh = make_mesh(C)
    with reads_logged() as log:
        model = load_hf_checkpoint(golden, mesh=mesh)
    assert not log.whole, log.whole[:5]
    read = {}
    for name, _, n in log.slices:
        read[name] = read.get(name, 0) + n
    wanted = set(files.names()) - hf_io.mtp_copies(model.config)
    assert set(read) == wanted, sorted(set(read) ^ wanted)
    for name, n in read.items():  # every element exactly once: distinct shards, no overlap
        assert n == int(np.prod(files.shape_of[name])), (name, n, files.shape_of[name])
    # lm_head.weight [w, d] is our kernel [d, w] transposed.
    kernel = model.lm_head.kernel[...]
    want = sorted((w, d) for d, w in device_boxes(kernel))
    assert log.boxes("lm_head.weight") == want and len(want) == 4, log.boxes("lm_head.weight")
    # Expert e of MoE layer 1 (stack index 0): [f, d] <- our [l, e, d, f].
    gate = model.moe_layers.mlp.gate_proj[...]
    e_count = gate.shape[1]
    for e in range(e_count):
        mine = [b for b in device_boxes(gate) if b[1][0] <= e < b[1][1]]
        want = sorted((f, d) for _, _, d, f in mine)
        got = log.boxes(f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
        assert got == want and len(want) == 4, (e, got, want)
    out = {"reads": len(log.slices), "lm_head boxes": log.boxes("lm_head.weight")}

    # FP8 on (fsdp=2, tensor=4): 136-row expert weights split in 34-row slices of 128-row
    # blocks; a slice's scale read covers only its blocks.
    mesh = make_mesh(A)
    fp8 = hf_io.SafetensorsDir(ctx["fp8_dir"], (128, 128))
    with reads_logged() as log:
        model = load_hf_checkpoint(ctx["fp8_dir"], mesh=mesh)
    assert not log.whole, log.whole[:5]
    assert_same_values(flat_arrays(model), ctx["fp8_single"])
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    weight_boxes = log.boxes(name)
    gate = model.moe_layers.mlp.gate_proj[...]
    assert weight_boxes == sorted((f, d) for _, _, d, f in device_boxes(gate)), weight_boxes
    scale_boxes = log.boxes(name + hf_io.SCALE_SUFFIX)
    assert scale_boxes == sorted(hf_io.scale_box(b, (128, 128)) for b in weight_boxes)
    grid = fp8.shape_of[name + hf_io.SCALE_SUFFIX]
    assert any(np.prod([b - a for a, b in box]) < np.prod(grid) for box in scale_boxes)
    out["fp8 weight boxes"] = weight_boxes
    out["fp8 scale boxes"] = scale_boxes
    return out


def check_custom_rules(ctx):
    """A table that shards only the experts: every other array replicated; the table is kept
    in model.config.sharding_rules and the model still gives HF's logits."""
    golden = GOLDENS / "a_qlora_yarn_sharded_mtp"
    rules = (("experts", "expert"), ("expert_mlp", "tensor"))
    mesh = make_mesh(C)
    model = load_hf_checkpoint(golden, mesh=mesh, rules=rules)
    assert model.config.sharding_rules == check_rules(rules), model.config.sharding_rules
    assert spec(model.moe_layers.mlp.gate_proj) == P(None, "expert", None, "tensor")
    assert spec(model.mtp[0].block.mlp.down_proj) == P("expert", "tensor")
    for x in (
        model.lm_head.kernel,
        model.embed_tokens.embedding,
        model.moe_layers.self_attn.kv_b_proj.kernel,
        model.dense_layers.mlp.gate_proj.kernel,
        model.moe_layers.mlp.shared_experts.up_proj.kernel,
    ):
        assert spec(x) == P(), (x, spec(x))
    assert_same_values(flat_arrays(model), ctx["a_single"])
    err = golden_logits_error(model, golden / "golden.npz")
    assert err < TOL, err
    return {"logits error": err}


def tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        max_position_embeddings=64, rope_scaling=None, num_nextn_predict_layers=1,
    )  # fmt: skip


def tiny_model(config: ModelConfig, mesh, seed: int) -> DeepseekV3:
    """The model with random values (no initializer run: nothing to compile), on ``mesh``."""
    graphdef, state = abstract_model(config, True)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), state)
    return shard_model(nnx.merge(graphdef, state), mesh)


def check_training_checkpoint_across_meshes(ctx):
    """A tiny model sharded on (data=2, expert=4), saved as the trainer saves, loads onto
    (fsdp=2, tensor=4) and onto one device with equal values; restore_training fills templates
    on a third mesh with their shardings (AdamW moments included)."""
    config = tiny_config()
    save_mesh = make_mesh(B)
    model = tiny_model(config, save_mesh, 3)
    _, params, _ = train_lib.split_model(model)
    tx = train_lib.make_optimizer(1e-3)
    with jax.set_mesh(save_mesh):
        opt_state = train_lib.init_opt_state(tx, params)
    # non-zero moments to compare (the step count stays an int)
    opt_state = jax.tree.map(
        lambda x: jax.device_put(np.asarray(x) + (0.5 if x.dtype.kind == "f" else 3), x.sharding),
        opt_state,
    )
    tokens = np.arange(200, dtype=np.int32) % config.vocab_size
    data_iter = iter(data.make_train_dataset(tokens, 8, 2, 0))
    next(data_iter)
    saved = flat_arrays(model)
    workdir = pathlib.Path(ctx["tmp"]) / "run"
    manager = checkpoint.make_manager(workdir, keep=1)
    meta = checkpoint.meta_for(config, None, model.num_mtp)
    checkpoint.save(manager, 5, nnx.state(model), opt_state, data_iter, meta)
    manager.wait_until_finished()

    other = make_mesh(A)
    loaded, meta = load_checkpoint(workdir, mesh=other)
    assert meta["step"] == 5
    assert_same_values(flat_arrays(loaded), saved)
    assert_rule_shardings(loaded, other)
    assert spec(loaded.moe_layers.mlp.gate_proj) == P(None, None, "fsdp", "tensor")
    single, _ = load_checkpoint(workdir)
    assert_same_values(flat_arrays(single), saved)
    for x in flat_arrays(single).values():
        assert len(x.sharding.device_set) == 1, x.sharding
    # The FP8 model from float weights: quantized on the mesh as on one device.
    fp8_one, _ = load_checkpoint(workdir, fp8=True)
    fp8_mesh, _ = load_checkpoint(workdir, mesh=other, fp8=True)
    want = fp8_quantize(saved["moe_layers.mlp.gate_proj"], WEIGHT_BLOCK)
    got = (fp8_one.moe_layers.mlp.gate_proj[...], fp8_one.moe_layers.mlp.gate_proj_scale_inv[...])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert_same_values(flat_arrays(fp8_mesh), flat_arrays(fp8_one))
    assert_rule_shardings(fp8_mesh, other)

    # Resume onto a third mesh: templates carry the shardings to restore into.
    third = make_mesh(C)
    fresh = tiny_model(config, third, 4)
    _, fresh_params, _ = train_lib.split_model(fresh)
    with jax.set_mesh(third):
        template_opt = train_lib.init_opt_state(tx, fresh_params)
    template_model = nnx.state(fresh)
    it = iter(data.make_train_dataset(tokens, 8, 2, 0))
    model_state, opt = checkpoint.restore_training(manager, 5, template_model, template_opt, it)
    manager.close()
    for want, got in ((template_model, model_state), (template_opt, opt)):
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            assert g.sharding == w.sharding, (g.sharding, w.sharding)
    restored = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(model_state)}
    assert_same_values(restored, saved)
    for w, g in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert spec(fresh.moe_layers.mlp.gate_proj) == P(None, "expert", "fsdp", "tensor")
    assert spec(model.moe_layers.mlp.gate_proj) == P(None, "expert")
    assert next(it).tolist() == next(data_iter).tolist()  # the data iterator resumed too
    return {"saved on": B, "loaded on": A, "resumed on": C}


def check_converted_across_meshes(ctx):
    """``convert.py hf_to_orbax`` folders (float32 and --keep_fp8) load onto meshes with the
    one-device values of the HF checkpoint and the rules' shardings."""
    out = pathlib.Path(ctx["tmp"]) / "conv_a"
    convert_hf.hf_to_orbax(GOLDENS / "a_qlora_yarn_sharded_mtp", out, "float32", progress=False)
    for axes in (C, B):
        mesh = make_mesh(axes)
        model, meta = load_checkpoint(out, mesh=mesh)
        assert meta["step"] == 0
        assert_same_values(flat_arrays(model), ctx["a_single"])
        assert_rule_shardings(model, mesh)
    keep = pathlib.Path(ctx["tmp"]) / "conv_fp8"
    convert_hf.hf_to_orbax(ctx["fp8_dir"], keep, keep_fp8=True, progress=False)
    mesh = make_mesh(A)
    model, _ = load_checkpoint(keep, dtype="float32", mesh=mesh)
    assert_same_values(flat_arrays(model), ctx["fp8_single"])  # dequantized shard by shard
    assert_rule_shardings(model, mesh)
    rules = (("experts", "expert"),)
    mesh = make_mesh(C)
    model, _ = load_checkpoint(keep, dtype="float32", mesh=mesh, rules=rules)
    assert model.config.sharding_rules == check_rules(rules), model.config.sharding_rules
    assert spec(model.moe_layers.mlp.gate_proj) == P(None, "expert")
    assert spec(model.lm_head.kernel) == P()
    return {"float32": [C, B], "keep_fp8": A, "keep_fp8 with custom rules": C}


def check_fp8_model_on_meshes(ctx):
    """``fp8=True`` onto meshes gives the one-device FP8 model's values (FP8 bytes and scales,
    quantized kernels alike) in the rules' shardings: from the HF folder (FP8 tensors read as
    device slices, their scales by the blocks the slices touch), from a --keep_fp8 folder, and
    from a float32 folder (quantized on load)."""
    mesh = make_mesh(A)
    with reads_logged() as log:
        model = load_hf_checkpoint(ctx["fp8_dir"], mesh=mesh, fp8=True)
    assert not log.whole, log.whole[:5]
    assert model.moe_layers.mlp.gate_proj[...].dtype == jnp.float8_e4m3fn
    assert_same_values(flat_arrays(model), ctx["fp8_model_single"])
    assert_rule_shardings(model, mesh)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    gate = model.moe_layers.mlp.gate_proj[...]
    assert log.boxes(name) == sorted((f, d) for _, _, d, f in device_boxes(gate)), log.boxes(name)
    keep = pathlib.Path(ctx["tmp"]) / "conv_fp8"  # written by check_converted_across_meshes
    if not keep.exists():
        convert_hf.hf_to_orbax(ctx["fp8_dir"], keep, keep_fp8=True, progress=False)
    model, _ = load_checkpoint(keep, dtype="float32", mesh=mesh, fp8=True)
    assert_same_values(flat_arrays(model), ctx["fp8_model_single"])
    assert_rule_shardings(model, mesh)
    f32 = pathlib.Path(ctx["tmp"]) / "conv_fp8_f32"
    convert_hf.hf_to_orbax(ctx["fp8_dir"], f32, "float32", progress=False)
    one, _ = load_checkpoint(f32, fp8=True)
    for axes in (B, C):
        mesh = make_mesh(axes)
        model, _ = load_checkpoint(f32, mesh=mesh, fp8=True)
        assert_same_values(flat_arrays(model), flat_arrays(one))
        assert_rule_shardings(model, mesh)
    return {"hf and keep_fp8": A, "quantized from float32": [B, C]}


CHECKS = [
    check_hf_goldens_match_on_meshes,
    check_hf_values_and_named_specs,
    check_reads_are_device_slices,
    check_custom_rules,
    check_training_checkpoint_across_meshes,
    check_converted_across_meshes,
    check_fp8_model_on_meshes,
]


def main(out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    assert pathlib.Path(hf_io.__file__).is_relative_to(ROOT), hf_io.__file__
    results: dict = {"seconds": {}, "details": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        fp8_dir = pathlib.Path(tmp) / "fp8"
        sha = fp8_checkpoint.build(fp8_dir)
        assert sha == str(np.load(GOLDENS / "fp8_official.npz")["files_sha256"])
        ctx = {
            "tmp": tmp,
            "fp8_dir": fp8_dir,
            # one-device references: each HF tensor read whole (the mesh=None path)
            "a_single": flat_arrays(load_hf_checkpoint(GOLDENS / "a_qlora_yarn_sharded_mtp")),
            "fp8_single": flat_arrays(load_hf_checkpoint(fp8_dir)),
            "fp8_model_single": flat_arrays(load_hf_checkpoint(fp8_dir, fp8=True)),
        }
        results["seconds"]["setup"] = round(time.time() - t, 2)
        for check in CHECKS:
            name = check.__name__.removeprefix("check_")
            t = time.time()
            try:
                results["details"][name] = check(ctx)
                results[name] = "ok"
            except Exception:  # reported to the pytest side, which fails that test
                results[name] = traceback.format_exc()
            results["seconds"][name] = round(time.time() - t, 2)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.devnull)
