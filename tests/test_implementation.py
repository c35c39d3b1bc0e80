"""Implementation switches reach every layer (issue 8, item 3).

``with_implementation`` on a loaded model must give exactly the computation of a model built with
that setting from the start: the jaxprs of the forward, the MTP forward, a decode step over the
latent cache and the training gradient are compared as text, so any layer that kept an old
setting (the head, a norm, the embedding, a dense projection, ...) fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDENS
from flax import nnx

from dsv3_jax import DeepseekV3, load_hf_checkpoint
from dsv3_jax.config import IMPLEMENTATION_FIELDS
from dsv3_jax.model import with_implementation

GOLDEN = GOLDENS / "a_qlora_yarn_sharded_mtp"  # q_lora, YaRN, MTP, sharded

# One non-default value per implementation field. Adding a field to IMPLEMENTATION_FIELDS without
# a row here fails test_every_field_is_switched.
SWITCHES = {
    "dtype": "bfloat16",
    "param_dtype": "bfloat16",
    "remat": "full",  # (True is accepted and stored as "full")
    "moe_impl": "ragged",
    "moe_dispatch": "gspmd",
    "moe_capacity_factor": 1.25,
    "mla_decode": "naive",
    "attention_kernel": "pallas",
    "sharding_rules": (("batch", ("data",)), ("experts", ("expert",))),  # as check_rules writes it
    "fp8_training": True,
    "fp8_kernel": "pallas",
}
# Switched on top of another setting (the FP8 GEMM's kernel acts only when FP8 GEMMs run).
ON_TOP = {"fp8_kernel": {"fp8_training": True}}
# Fields that change how weights are stored: with_implementation refuses them (load instead).
STRUCTURAL = {"fp8_weights": True}


def _eqns(jaxpr):
    """Every equation of a closed jaxpr, sub-jaxprs (scan, pjit, remat, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            subs = value if isinstance(value, (tuple, list)) else [value]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _programs(model: DeepseekV3) -> dict[str, jax.extend.core.ClosedJaxpr]:
    """Jaxprs of the model's computations: forward + MTP, one decode step, training gradient."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 8)))

    def forward(params, rest):
        m = nnx.merge(graphdef, params, rest)
        out = m.forward(ids)
        return out.logits, m.mtp_forward(ids, out.hidden)[0]

    def decode(params, rest):
        m = nnx.merge(graphdef, params, rest)
        cache = m.init_cache(2, 16)
        positions = jnp.full((2, 1), 3, jnp.int32)
        return m.forward(ids[:, :1], positions, cache).logits

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest)
        return m.forward(ids).logits.mean()

    return {
        "forward": jax.make_jaxpr(forward)(params, rest),
        "decode": jax.make_jaxpr(decode)(params, rest),
        "grad": jax.make_jaxpr(jax.grad(loss))(params, rest),
    }


def _fresh(config) -> DeepseekV3:
    """A model built with ``config`` from the start (abstract: only shapes and dtypes matter)."""
    return nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def baseline():
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    return {k: str(v) for k, v in _programs(model).items()}


def test_every_field_is_switched():
    assert set(SWITCHES) | set(STRUCTURAL) == set(IMPLEMENTATION_FIELDS)


@pytest.mark.parametrize("field", sorted(STRUCTURAL))
def test_structural_fields_are_refused(field):
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    with pytest.raises(ValueError, match=field):
        with_implementation(model, **{field: STRUCTURAL[field]})


@pytest.mark.parametrize("field", sorted(SWITCHES))
def test_switch_changes_every_layer(field, baseline):
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    if field in ON_TOP:
        with_implementation(model, **ON_TOP[field])
        baseline = {k: str(v) for k, v in _programs(model).items()}
    with_implementation(model, **{field: SWITCHES[field]})
    assert getattr(model.config, field) == SWITCHES[field]
    switched = {k: str(v) for k, v in _programs(model).items()}
    expected = {k: str(v) for k, v in _programs(_fresh(model.config)).items()}
    for name in switched:
        assert switched[name] == expected[name], f"{field}: {name} differs from a fresh model"
    mesh_only = ("sharding_rules", "moe_dispatch", "moe_capacity_factor")
    if field not in mesh_only:  # those act under a mesh only: test_mesh.py, test_moe_ep.py
        assert switched != baseline, f"{field}={SWITCHES[field]!r} changed no computation"


def _dot_dtypes(jaxpr, n_experts: int) -> set:
    """Operand dtypes of every matmul except the router's (float32 by design, [.., d] x [d, e])."""
    found = set()
    for eqn in _eqns(jaxpr.jaxpr):
        if eqn.primitive.name in ("dot_general", "ragged_dot", "ragged_dot_general"):
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            if rhs.shape[-1] == n_experts and rhs.ndim == 2:
                continue
            found.add((lhs.dtype.name, rhs.dtype.name))
    return found


def test_dtype_reaches_head_norms_embedding_and_projections():
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    e = model.config.n_routed_experts
    assert _dot_dtypes(_programs(model)["forward"], e) == {("float32", "float32")}
    with_implementation(model, dtype="bfloat16")
    program = _programs(model)["forward"]
    assert _dot_dtypes(program, e) == {("bfloat16", "bfloat16")}
    # The embedding lookup is cast to the computation dtype and the norms return it.
    eqns = list(_eqns(program.jaxpr))
    converts = [q.params["new_dtype"] for q in eqns if q.primitive.name == "convert_element_type"]
    assert jnp.bfloat16 in converts
    logits, mtp = model(np.zeros((1, 4), np.int32), return_mtp=True)
    assert logits.dtype == jnp.float32 and mtp[0].dtype == jnp.float32  # the head returns f32
    with_implementation(model, dtype="float32")  # and back
    assert _dot_dtypes(_programs(model)["forward"], e) == {("float32", "float32")}


def test_param_dtype_casts_weights_but_not_router_or_bias():
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    before = np.asarray(model.lm_head.kernel[...])
    with_implementation(model, param_dtype="bfloat16")
    params = nnx.state(model, nnx.Param)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(params)}
    router = {k for k in flat if "/gate/kernel" in k}
    assert router and all(flat[k].get_value().dtype == jnp.float32 for k in router)
    others = set(flat) - router
    assert others and all(flat[k].get_value().dtype == jnp.bfloat16 for k in others)
    bias = nnx.to_flat_state(nnx.state(model, lambda _, v: "ExpertBias" in type(v).__name__))
    assert bias and all(v.get_value().dtype == jnp.float32 for _, v in bias)
    np.testing.assert_array_equal(
        np.asarray(model.lm_head.kernel[...], np.float32), before.astype(jnp.bfloat16)
    )


def test_results_follow_the_switch():
    """Values, not just programs: a bf16 switch moves logits by bf16 rounding, no more."""
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 8))
    ref = np.asarray(model(ids))
    with_implementation(model, dtype="bfloat16")
    low = np.asarray(model(ids))
    assert 0 < np.abs(low - ref).max() < 0.1 * np.abs(ref).max()
    with_implementation(model, dtype="float32")
    np.testing.assert_array_equal(np.asarray(model(ids)), ref)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(hidden_size=64), "only implementation fields"),
        (dict(dtype="float8"), "dtype"),
        (dict(moe_impl="fast"), "moe_impl"),
    ],
)
def test_bad_switches_are_named(changes, match):
    model = load_hf_checkpoint(GOLDEN, dtype=jnp.float32)
    with pytest.raises(ValueError, match=match):
        with_implementation(model, **changes)
    assert model.config.dtype == "float32" and model.config.moe_impl == "auto"
