import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_config import TINY
from test_moe import np_route

from dsv3_jax import DeepseekV3, ModelConfig
from dsv3_jax.layers import product
from dsv3_jax.model import _run_stack


@pytest.fixture(scope="module")
def model():
    return DeepseekV3(
        ModelConfig(**TINY, num_nextn_predict_layers=2, initializer_range=0.2), rngs=nnx.Rngs(0)
    )


@pytest.mark.parametrize("bad", [[[0, 64]], [[-1, 3]], [[0.5, 1.0]], [1, 2, 3]])
def test_bad_ids_raise_before_compiling(model, bad):
    with pytest.raises(ValueError, match="input_ids"):
        model(np.asarray(bad))


def test_output_shapes_and_mtp(model):
    ids = np.random.default_rng(0).integers(0, 64, (2, 10))
    logits, mtp = model(ids, return_mtp=True)
    assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
    assert [m.shape for m in mtp] == [(2, 9, 64), (2, 8, 64)]


def test_causal(model):
    ids = np.random.default_rng(1).integers(0, 64, (1, 12))
    changed = ids.copy()
    changed[0, 8] = (ids[0, 8] + 1) % 64
    a, ma = model(ids, return_mtp=True)
    b, mb = model(changed, return_mtp=True)
    np.testing.assert_array_equal(np.asarray(a[:, :8]), np.asarray(b[:, :8]))
    assert not np.allclose(np.asarray(a[:, 8]), np.asarray(b[:, 8]))
    # MTP depth k at row t sees tokens up to t + k.
    np.testing.assert_array_equal(np.asarray(ma[0][:, :7]), np.asarray(mb[0][:, :7]))
    np.testing.assert_array_equal(np.asarray(ma[1][:, :6]), np.asarray(mb[1][:, :6]))


def test_mtp_follows_eq_21(model):
    """h'_t = eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)]), embedding first; head shared."""
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 9)))
    out = model.forward(ids)
    _, mtp = model(ids, return_mtp=True)
    h, emb = out.hidden, model.embed_tokens.embedding[...]
    for k, mod in enumerate(model.mtp, start=1):
        s = 9 - k
        x = jnp.concatenate([mod.enorm(emb[ids[:, k:]]), mod.hnorm(h[:, :s])], -1)
        x = x @ mod.eh_proj.kernel[...]
        pos = jnp.broadcast_to(jnp.arange(s), (2, s))
        h, _, _ = mod.block(x, pos)
        want = mod.shared_head_norm(h) @ model.lm_head.kernel[...]
        np.testing.assert_allclose(np.asarray(mtp[k - 1]), np.asarray(want), atol=1e-5)


def test_bf16_compute_close_to_float32():
    cfg = ModelConfig(**TINY, initializer_range=0.2)
    ids = np.random.default_rng(3).integers(0, 64, (2, 8))
    f32 = DeepseekV3(cfg, rngs=nnx.Rngs(0))(ids)
    bf16 = DeepseekV3(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))(ids)
    assert bf16.dtype == jnp.float32  # logits come out in float32 whatever the compute dtype
    # A bf16 rounding can flip a near-tied expert choice, so compare typical, not worst, error.
    assert float(jnp.median(jnp.abs(f32 - bf16))) < 0.05 * float(jnp.abs(f32).mean())


def test_layers_declare_logical_axes(model):
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    axes = lambda *p: tuple(flat[p].get_metadata()["out_sharding"])
    assert axes("moe_layers", "mlp", "gate_proj") == ("layers", "experts", "embed", "expert_mlp")
    assert axes("moe_layers", "mlp", "shared_experts", "down_proj", "kernel") == (
        "layers", "shared_mlp", "embed",
    )  # fmt: skip
    assert axes("dense_layers", "mlp", "up_proj", "kernel") == ("layers", "embed", "mlp")
    assert axes("embed_tokens", "embedding") == ("vocab", "embed")
    assert axes("lm_head", "kernel") == ("embed", "vocab")
    assert axes("dense_layers", "self_attn", "kv_b_proj", "kernel") == (
        "layers", "kv_lora", "kv_heads",
    )  # fmt: skip
    assert axes("dense_layers", "self_attn", "q_b_proj", "kernel") == (
        "layers", "q_lora", "q_heads",
    )  # fmt: skip
    assert axes("dense_layers", "self_attn", "o_proj", "kernel") == ("layers", "o_heads", "embed")
    assert axes("moe_layers", "mlp", "gate", "e_score_correction_bias") == ("layers", "router")
    for path, var in flat.items():  # every variable declares one name per axis
        assert len(var.get_metadata()["out_sharding"]) == var.ndim, path


def test_product_is_the_projection_helper():
    cfg = ModelConfig(**TINY)
    w = jnp.arange(20.0).reshape(4, 5)
    for rows in (1, 2, 3):  # 2 rows: XLA:CPU's two 1-row products
        x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 3, 4)), jnp.float32)
        np.testing.assert_allclose(
            np.asarray(product(x, w, cfg)), np.einsum("bsi,io->bso", x, w), rtol=1e-6
        )
    ws = jnp.stack([w, 2 * w])  # a stack of kernels: one product per leading index
    x = jnp.ones((2, 3, 4))
    np.testing.assert_allclose(np.asarray(product(x, ws, cfg)), np.einsum("gsi,gio->gso", x, ws))


def test_remat_gives_same_gradients():
    cfg = ModelConfig(**TINY, initializer_range=0.2)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 8)))

    def grads(c):
        m = DeepseekV3(c, rngs=nnx.Rngs(0))
        return nnx.grad(lambda m: m.forward(ids).logits.sum())(m)

    a, b = grads(cfg), grads(cfg.replace(remat=True))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        # Recomputation may fuse differently: float32 rounding relative to the tensor's scale
        # (an element of 0.008 beside ones of 50 moved by 3e-6 under a loaded machine).
        scale = float(np.abs(np.asarray(y)).max())
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6 * scale)


def test_ids_edge_cases(model):
    with pytest.raises(ValueError, match="length 0"):
        model(np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="return_mtp needs more than 2 tokens"):
        model(np.zeros((1, 2), np.int32), return_mtp=True)
    np.testing.assert_array_equal(
        np.asarray(model([[0, 1, 2]])), np.asarray(model(np.array([[0, 1, 2]])))
    )


def test_attention_kernel_switch_runs_the_pallas_kernels_inside_the_model():
    """The same weights with attention_kernel="pallas" (interpret mode on CPU): flash attention
    in the forward and prefill, latent decode attention over the cache; equal to the reference."""
    from dsv3_jax import generate
    from dsv3_jax.model import with_implementation

    model = DeepseekV3(ModelConfig(**TINY, initializer_range=0.3), rngs=nnx.Rngs(4))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 11))
    prompts = [[0, 5, 9, 3], [0, 7]]
    ref_logits, ref_out = np.asarray(model(ids)), generate(model, prompts, 5)
    with_implementation(model, attention_kernel="pallas")
    assert model.moe_layers.self_attn.config.attention_kernel == "pallas"
    np.testing.assert_allclose(np.asarray(model(ids)), ref_logits, atol=1e-4, rtol=0)
    assert generate(model, prompts, 5) == ref_out
    with pytest.raises(ValueError, match="hidden_size"):
        with_implementation(model, hidden_size=64)


def test_training_gradients_through_the_pallas_flash_attention():
    """train_lib's loss gradients with attention_kernel="pallas" equal the reference's."""
    from dsv3_jax import train_lib

    cfg = ModelConfig(**TINY, initializer_range=0.3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 10)))
    grads = []
    for kernel in ("reference", "pallas"):
        model = DeepseekV3(cfg.replace(attention_kernel=kernel), rngs=nnx.Rngs(6))
        graphdef, params, biases = train_lib.split_model(model)

        def loss(p, graphdef=graphdef, biases=biases):
            model = nnx.merge(graphdef, p, biases)
            logits = model(tokens[:, :-1])
            return train_lib.cross_entropy(logits, tokens[:, 1:])[0]

        grads.append(jax.grad(loss)(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        # float32 rounding relative to the tensor's scale (small elements beside large ones)
        scale = max(1.0, float(np.abs(np.asarray(a)).max()))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5 * scale, rtol=1e-3)


def test_expert_choices_equal_float64_routing_of_each_layers_input(model):
    """expert_choices against np_route on the MoE inputs, found by running the layers one by one."""
    cfg = model.config
    bias = np.random.default_rng(4).normal(size=(cfg.num_moe_layers, 8)) * 0.3
    saved = model.moe_layers.mlp.gate.e_score_correction_bias[...]
    model.moe_layers.mlp.gate.e_score_correction_bias[...] = jnp.asarray(bias, jnp.float32)
    try:
        _check_expert_choices(model, bias)
    finally:
        model.moe_layers.mlp.gate.e_score_correction_bias[...] = saved


def _check_expert_choices(model, bias):
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 11)))
    got = np.asarray(model.expert_choices(ids))
    assert got.shape == (cfg.num_moe_layers, 2, 11, 2) and got.dtype == np.int32
    pos = jnp.broadcast_to(jnp.arange(11), ids.shape)
    h = model.embed_tokens(ids)
    h, _, _ = _run_stack(model.dense_layers, h, pos, None, False)
    graphdef, state = nnx.split(model.moe_layers)
    load = model.forward(ids).aux["load"]
    for i in range(cfg.num_moe_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
        attn, _ = layer.self_attn(layer.input_layernorm(h), pos)
        u = np.asarray(layer.post_attention_layernorm(h + attn), np.float64).reshape(-1, 32)
        scores = 1 / (1 + np.exp(-(u @ np.asarray(layer.mlp.gate.kernel[...], np.float64))))
        want, _ = np_route(scores, bias[i], cfg)
        np.testing.assert_array_equal(got[i].reshape(-1, 2), want)
        np.testing.assert_array_equal(np.bincount(got[i].reshape(-1), minlength=8), load[i])
        h, _, _ = layer(h, pos)


def test_expert_choices_rejects_bad_ids(model):
    with pytest.raises(ValueError, match="input_ids"):
        model.expert_choices(np.asarray([[0, 64]]))
