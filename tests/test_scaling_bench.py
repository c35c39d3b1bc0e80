"""bench/scaling_bench.py's HLO collective counter: hand-written HLO text (async pairs, tuple
results, wrapped async ops, while loops) here, and a compiled program with known collectives on
8 fake CPU devices in a subprocess (this process keeps one device)."""

import importlib.util
import json
import os
import textwrap

import pytest
from conftest import ROOT, run_script

_spec = importlib.util.spec_from_file_location("scaling_bench", ROOT / "bench/scaling_bench.py")
scaling_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling_bench)

HLO = """\
HloModule m, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

%wrapped_all_to_all (p: bf16[8,4]) -> bf16[8,4] {
  %p = bf16[8,4]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[8,4]{1,0} all-to-all(%p), channel_id=5, replica_groups={{0,1}}, dimensions={0}
}

%body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[16]{0} get-tuple-element(%t), index=1
  %ars = f32[16]{0} all-reduce-start(%v), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars), metadata={op_name="jit(f)/while/body/psum"}
  ROOT %r = (s32[], f32[16]{0}) tuple(%i, %ard)
}

%cond (t: (s32[], f32[16])) -> pred[] {
  %t = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8], b: bf16[8,4], m: pred[4]) -> (s32[], f32[16]) {
  %a = f32[8]{0} parameter(0)
  %b = bf16[8,4]{1,0} parameter(1)
  %m = pred[4]{0} parameter(2)
  %ags = (f32[8]{0}, f32[16]{0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  %cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%agd), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[16]{0} collective-permute-done(%cps)
  %ar = (f32[16]{0}, pred[4]{0}) all-reduce(%cpd, %m), channel_id=4, replica_groups={{0,1}}, to_apply=%add
  %as = ((bf16[8,4]{1,0}), bf16[8,4]{1,0}, u32[]) async-start(%b), calls=%wrapped_all_to_all
  %ad = bf16[8,4]{1,0} async-done(%as), calls=%wrapped_all_to_all
  %rs = f32[8]{0} reduce-scatter(%agd), channel_id=6, replica_groups={{0,1}}, dimensions={0}, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], f32[16]{0}) tuple(%zero, %agd)
  ROOT %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


@pytest.mark.parametrize(
    "shape, nbytes",
    [
        ("f32[8,16]{1,0}", 512),
        ("bf16[2,3]{1,0}", 12),
        ("pred[3]{0}", 3),
        ("f32[]", 4),
        ("(f32[], s4[4]{0})", 6),
        ("(f32[2]{0}, /*index=1*/token[])", 8),
        ("f8e4m3fn[16]{0}", 16),
    ],
)
def test_shape_bytes(shape, nbytes):
    assert scaling_bench.shape_bytes(shape) == nbytes


def test_collectives_hand_written_hlo():
    found = scaling_bench.collectives(HLO)
    kinds = {k: (v["count"], v["bytes"]) for k, v in found["kinds"].items()}
    assert kinds == {
        "all-gather": (1, 64),  # the -done only: f32[16]; the -start tuple also holds the operand
        "all-reduce": (1 + 4, 16 * 4 + 4 + 4 * 64),  # tuple (f32[16], pred[4]) + 4 loop trips
        "reduce-scatter": (1, 32),
        "all-to-all": (1, 64),  # inside async-start/done's wrapped computation, counted once
        "collective-permute": (1, 64),
    }
    assert found["kinds"]["all-reduce"]["static"] == 2
    assert not found["unknown_trips"]
    loop = [o for o in found["ops"] if o["times"] == 4]
    assert [o["op_name"] for o in loop] == ["jit(f)/while/body/psum"]


def test_collectives_unknown_trip_count():
    hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    found = scaling_bench.collectives(hlo)
    assert found["unknown_trips"]
    assert found["kinds"]["all-reduce"]["count"] == 2  # the loop's all-reduce counted once


_COMPILED = """
import functools, json, sys
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import importlib.util
spec = importlib.util.spec_from_file_location("scaling_bench", "bench/scaling_bench.py")
scaling_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling_bench)
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("x",), (AxisType.Auto,))

@jax.jit
@functools.partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
def explicit(a):  # a: local [8, 16] float32 (512 bytes)
    s = jax.lax.psum(a, "x")  # all-reduce [8, 16]
    g = jax.lax.all_gather(s * 2, "x", tiled=True)  # all-gather [64, 16]
    r = jax.lax.psum_scatter(g + 1, "x", tiled=True)  # reduce-scatter [8, 16]
    t = jax.lax.all_to_all(r * 3, "x", 0, 0, tiled=True)  # all-to-all [8, 16]
    p = jax.lax.ppermute(t + 2, "x", perm=[(i, (i + 1) % 8) for i in range(8)])
    c, _ = jax.lax.scan(lambda c, _: (jax.lax.psum(c, "x") * 0.5, None), p, None, length=3)
    return c  # 3 more all-reduces [8, 16], one per scan step

a = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("x")))
total = jax.jit(lambda a: jnp.sum(a * a))  # GSPMD: partial sums, one all-reduce of f32[]
out = {
    "explicit": scaling_bench.collectives(explicit.lower(a).compile().as_text())["kinds"],
    "gspmd": scaling_bench.collectives(total.lower(a).compile().as_text())["kinds"],
}
print(json.dumps(out))
"""


def test_collectives_compiled_on_8_fake_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(ROOT)
    r = run_script(["-c", textwrap.dedent(_COMPILED)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    explicit = {k: (v["count"], v["bytes"]) for k, v in out["explicit"].items()}
    assert explicit == {
        "all-gather": (1, 64 * 16 * 4),
        "all-reduce": (1 + 3, 4 * 512),
        "reduce-scatter": (1, 512),
        "all-to-all": (1, 512),  # a tuple of 8 [1, 16] pieces on CPU: one op
        "collective-permute": (1, 512),
    }
    gspmd = {k: (v["count"], v["bytes"]) for k, v in out["gspmd"].items() if v["count"]}
    assert gspmd == {"all-reduce": (1, 4)}


def test_mesh_variants_and_moe_scopes():
    assert scaling_bench.parse_mesh("data=2,expert=4/gspmd") == {"data": 2, "expert": 4}
    assert scaling_bench.parse_variant("data=2,expert=4/gspmd") == {"moe_dispatch": "gspmd"}
    assert scaling_bench.parse_variant("expert=8/cf=1.25") == {
        "moe_dispatch": "all_to_all", "moe_capacity_factor": 1.25,
    }  # fmt: skip
    assert scaling_bench.parse_variant("expert=8") == {}
    with pytest.raises(ValueError, match="unknown variant"):
        scaling_bench.parse_variant("expert=8/fast")
    moe = scaling_bench._MOE_SCOPES.search
    assert moe("jit(train_step)/jvp()/while/body/eval_jaxpr/expert_parallel/shard_map/all_to_all")
    assert moe("jit(train_step)/(jvp(dispatch)/gather:jvp(combine)/gather)")
    assert moe("jit(train_step)/transpose(jvp(combine))/gather")
    assert not moe("jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/router/dot_general")
