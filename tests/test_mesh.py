"""Sharded execution equals single-device execution (issue: device mesh).

Multi-device work runs in a subprocess with 8 fake CPU devices (tests/mesh_scripts/parity.py),
so the rest of the suite keeps its single device. In-process tests cover the rules table.
"""

import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax import sharding


@pytest.fixture(scope="module")
def parity(parity_report):
    return parity_report  # two halves, started with the session (conftest.MESH_JOBS)


MESHES = ["data=8", "fsdp=2,tensor=4", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_grads_step_and_generate_equal_single_device(parity, mesh):
    got = parity["meshes"][mesh]
    for key in ("logits", "loss", "grads", "params", "biases"):
        assert got[key] < 1e-5, (mesh, key, got[key])
    assert got["biases_moved"]  # the bias update ran (and matched the global-batch loads)
    assert got["tokens_equal"]
    assert got["stats_equal"]  # new-token count of the caller's rows only
    assert got["opt_specs_match"]  # AdamW moments sharded like their parameters


def test_specs_follow_the_rules(parity):
    specs = parity["meshes"]["fsdp=2,expert=2,tensor=2"]["specs"]
    assert specs["moe_layers.mlp.gate_proj"] == str(P(None, "expert", "fsdp", "tensor"))
    assert specs["lm_head.kernel"] == str(P("fsdp", "tensor"))
    assert specs["embed_tokens.embedding"] == str(P("tensor", "fsdp"))
    assert specs["dense_layers.self_attn.kv_b_proj.kernel"] == str(P(None, None, "tensor"))
    assert specs["dense_layers.self_attn.o_proj.kernel"] == str(P(None, "tensor", "fsdp"))
    assert specs["moe_layers.mlp.gate.kernel"] == str(P(None, "fsdp"))  # router: columns whole
    data = parity["meshes"]["data=8"]["specs"]
    assert set(data.values()) == {str(P())}  # pure data parallelism replicates every weight


def test_another_rules_table(parity):
    got = parity["other_rules"]
    for key in ("logits", "loss", "grads", "params", "biases"):
        assert got[key] < 1e-5, (key, got[key])
    assert got["tokens_equal"]
    specs = got["specs"]
    assert specs["moe_layers.mlp.gate_proj"] == str(P(None, ("expert", "tensor")))
    assert specs["lm_head.kernel"] == str(P())


# ----------------------------------------------------------------------------- in-process
def test_make_mesh_errors_name_the_sizes():
    n = jax.device_count()
    with pytest.raises(ValueError, match=r"data=2, fsdp=1, expert=4, tensor=1\) has 8 devices"):
        sharding.make_mesh({"data": 2, "expert": 4})
    with pytest.raises(ValueError, match="unknown mesh axes \\['pipeline'\\]"):
        sharding.make_mesh({"pipeline": 1})
    with pytest.raises(ValueError, match="'tensor' must have a positive int size, got 0"):
        sharding.make_mesh({"tensor": 0})
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "expert": 1, "tensor": 1}


def test_logical_to_spec():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"), rules) == P(
        None, "expert", "fsdp", "tensor"
    )
    assert sharding.logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp", "expert"))
    mesh = jax.sharding.AbstractMesh((2, 1, 4, 1), sharding.MESH_AXES)
    # Size-1 axes are dropped; axes that do not divide a dimension are dropped from the right.
    assert sharding.logical_to_spec(("batch", "seq"), rules, (8, 5), mesh) == P(("data", "expert"))
    assert sharding.logical_to_spec(("batch", "seq"), rules, (2, 5), mesh) == P("data")
    assert sharding.logical_to_spec(("batch", "seq"), rules, (3, 5), mesh) == P()


def test_rules_that_map_two_dimensions_to_one_axis_are_refused():
    rules = (("embed", "fsdp"), ("vocab", "fsdp"))
    with pytest.raises(ValueError, match="'vocab' and 'embed' .* both map to mesh axis 'fsdp'"):
        sharding.logical_to_spec(("vocab", "embed"), rules)
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.check_rules((("embed", "model"),))
    with pytest.raises(ValueError, match="list 'embed' twice"):
        sharding.check_rules((("embed", None), ("embed", "fsdp")))


def test_single_device_code_is_unchanged():
    x = jax.numpy.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x  # no mesh: a no-op


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
