import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, train_lib


def tiny_model(**kw):
    return DeepseekV3(ModelConfig(**{**TINY, "initializer_range": 0.1, **kw}), rngs=nnx.Rngs(0))


def test_lr_schedule_shape():
    sched = train_lib.lr_schedule(1.0, 0.1, warmup_steps=10, decay_start=50, total_steps=100)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(4)) == pytest.approx(0.5)
    assert float(sched(9)) == pytest.approx(1.0) and float(sched(49)) == pytest.approx(1.0)
    assert float(sched(75)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(sched(100)) == pytest.approx(0.1)
    no_warmup = train_lib.lr_schedule(1.0, 0.1, warmup_steps=0, decay_start=0, total_steps=10)
    assert float(no_warmup(0)) == pytest.approx(1.0) and float(no_warmup(10)) == pytest.approx(0.1)


def test_decay_mask_skips_norms_embeddings_and_biases():
    _, params, biases = train_lib.split_model(tiny_model())
    flat = dict(nnx.to_flat_state(train_lib.decay_mask(params)))
    get = lambda *p: bool(flat[p].get_value())
    assert get("moe_layers", "mlp", "gate_proj") and get("lm_head", "kernel")
    assert get("dense_layers", "self_attn", "q_b_proj", "kernel")
    assert not get("moe_layers", "input_layernorm", "weight") and not get("norm", "weight")
    assert not get("embed_tokens", "embedding")
    assert not any("e_score_correction_bias" in map(str, p) for p, _ in nnx.to_flat_state(params))
    assert len(jax.tree.leaves(biases)) == 2  # main MoE stack [l, e] and the MTP block [e]


def test_mtp_loss_is_the_mean_ce_of_the_mtp_heads():
    model = tiny_model(num_nextn_predict_layers=2)
    graphdef, params, biases = train_lib.split_model(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)))
    loss, m = train_lib.loss_fn(
        params, biases, graphdef, tokens, train_lib.LossWeights(0.3, 1e-4, 1e-3)
    )
    logits, mtp = model(tokens[:, :-1], return_mtp=True)

    def ce(lo, tgt):
        lp = np.asarray(jax.nn.log_softmax(lo), np.float64)
        return -np.take_along_axis(lp, np.asarray(tgt)[..., None], -1).mean()

    main = ce(logits, tokens[:, 1:])
    mtp_ces = [ce(mtp[0], tokens[:, 2:]), ce(mtp[1], tokens[:, 3:])]  # depth k predicts t + k + 1
    assert float(m["ce"]) == pytest.approx(main, rel=1e-5)
    assert float(m["mtp_ce"]) == pytest.approx(np.mean(mtp_ces), rel=1e-5)
    assert float(loss) == pytest.approx(
        main + 0.3 * np.mean(mtp_ces) + 1e-4 * float(m["balance"]), rel=1e-5
    )
    assert m["main_load"].shape == (2, 8) and float(m["main_load"].sum()) == 2 * 10 * 2 * 2


def test_train_step_learns_and_updates_bias_outside_the_optimizer():
    model = tiny_model()
    graphdef, params, biases = train_lib.split_model(model)
    tx = train_lib.make_optimizer(3e-3, mask=train_lib.decay_mask(params))
    opt_state = tx.init(params)
    assert not any(
        isinstance(x, jax.Array) and x.shape[-1:] == (8,) and x.ndim <= 2 and "bias" in str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 17)))
    weights = train_lib.LossWeights(0.3, 1e-4, 1e-3)
    old_bias = jax.tree.map(np.asarray, biases)
    losses = []
    for _ in range(30):
        params, biases, opt_state, m = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, tokens
        )
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b), biases, old_bias)
    for x in jax.tree.leaves(moved):  # each step moves each bias by -gamma, 0 or +gamma
        assert x.max() <= 30 * 1e-3 + 1e-6 and x.max() > 0


def _step(model, tokens, weights, microbatches, steps=2):
    """``steps`` train steps with SGD + momentum: linear in the gradients, so float32 rounding
    differences stay as small as the gradients' (AdamW's first steps divide g by |g| + eps and
    amplify the rounding of near-zero gradients)."""
    graphdef, params, biases = train_lib.split_model(model)
    params, biases = jax.tree.map(jnp.copy, (params, biases))  # train_step donates them
    tx = optax.sgd(0.5, momentum=0.9)
    opt_state = tx.init(params)
    for _ in range(steps):
        params, biases, opt_state, m = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, tokens, microbatches=microbatches
        )
    return jax.tree.map(np.asarray, (params, biases, opt_state, m))


def _assert_trees_close(a, b, tol=1e-6):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(y, x, rtol=tol, atol=tol)


def test_gradient_accumulation_equals_the_whole_batch_step():
    # Reference: the whole batch at once (microbatches=1: one value_and_grad, no scan).
    model = tiny_model(num_nextn_predict_layers=1)
    graphdef, params, biases = train_lib.split_model(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 13)), jnp.int32)
    weights = train_lib.LossWeights(0.3, 1e-2, 1e-2)
    grads = jax.jit(train_lib._accumulated_grads, static_argnums=(2, 5))
    whole_grads, micro_grads = (grads(params, biases, graphdef, tokens, weights, m) for m in (1, 4))
    _assert_trees_close(whole_grads, micro_grads)  # loss, metrics (loads summed), gradients
    assert float(micro_grads[0][1]["main_load"].sum()) == 2 * 8 * 12 * 2  # layers, b, s, k
    whole, micro = _step(model, tokens, weights, 1), _step(model, tokens, weights, 4)
    _assert_trees_close(whole, micro)  # params, biases, optimizer state, metrics after 2 steps
    bias = max(np.abs(x).max() for x in jax.tree.leaves(whole[1]))
    assert bias == pytest.approx(2e-2)  # moved once per step, by gamma


def test_microbatches_must_divide_the_batch():
    model = tiny_model()
    tokens = jnp.zeros((6, 9), jnp.int32)
    with pytest.raises(ValueError, match="microbatches=4"):
        _step(model, tokens, train_lib.LossWeights(), 4, steps=1)


def test_loss_weights_are_traced_a_schedule_does_not_recompile():
    model = tiny_model()
    graphdef, params, biases = train_lib.split_model(model)
    tx = train_lib.make_optimizer(1e-3, mask=train_lib.decay_mask(params))
    opt_state = tx.init(params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 9)), jnp.int32)
    before = train_lib.train_step._cache_size()
    for gamma in (1e-3, 0.0):
        old = jax.tree.map(np.array, biases)
        params, biases, opt_state, _ = train_lib.train_step(
            graphdef, tx, train_lib.LossWeights(0.3 - gamma * 100, 1e-4, gamma), params, biases,
            opt_state, tokens,
        )  # fmt: skip
        new = jax.tree.leaves(biases)
        moved = max(
            np.abs(np.asarray(a) - b).max() for a, b in zip(new, jax.tree.leaves(old), strict=True)
        )
        assert moved == pytest.approx(gamma)  # gamma 0 (the final stretch): the bias stays
    assert train_lib.train_step._cache_size() == before + 1


def test_final_stretch_schedules():
    # lambda 0.3 then 0.1 for the last quarter; gamma 1e-3 then 0 for the last 10%.
    lam = [train_lib.final_stretch_value(i, 0.3, 0.1, 0.25, 100) for i in range(100)]
    assert lam[:75] == [0.3] * 75 and lam[75:] == [0.1] * 25
    gam = [train_lib.final_stretch_value(i, 1e-3, 0.0, 0.1, 100) for i in range(100)]
    assert gam.count(0.0) == 10 and gam[89] == 1e-3
    assert {train_lib.final_stretch_value(i, 0.3, 0.1, 0.0, 10) for i in range(10)} == {0.3}


def test_batch_size_ramp_steps_up_in_a_few_sizes():
    stages = train_lib.batch_size_stages(16, 4, ramp_steps=30, stages=3, unit=4)
    assert stages == ((0, 4), (10, 8), (20, 12), (30, 16))
    sizes = [train_lib.batch_size_at(stages, i) for i in range(40)]
    assert sizes[:10] == [4] * 10 and sizes[10:20] == [8] * 10 and sizes[30:] == [16] * 10
    # rows rounded down to the unit (e.g. 2 micro-batches x 2 batch shards)
    assert train_lib.batch_size_stages(24, 4, 8, 4, unit=4) == (
        (0, 4),
        (2, 8),
        (4, 12),
        (6, 16),
        (8, 24),
    )
    assert train_lib.batch_size_stages(16, 0, 30, 3) == ((0, 16),)
    with pytest.raises(ValueError, match="multiple of 4"):
        train_lib.batch_size_stages(16, 6, 30, 3, unit=4)


def test_fused_cross_entropy_and_its_gradient_equal_float64_numpy():
    """token_nll's value and custom backward against float64 log-softmax, with large logits (the
    logsumexp must be shifted), a masked position and a vocabulary not a multiple of 8."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 37)) * 4.0
    logits[0, 1] += 80.0  # exp would overflow float32 without the shift
    targets = rng.integers(0, 37, size=(2, 5))
    mask = np.ones((2, 5))
    mask[1, 3] = 0.0
    weights = rng.normal(size=(2, 5))  # an arbitrary cotangent per token

    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # float64
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    onehot = np.eye(37)[targets]
    grad = (np.exp(log_probs) - onehot) * (weights * mask)[..., None]  # d/dlogits sum(w m nll)

    x, t, m = (jnp.asarray(a, jnp.float32) for a in (logits, targets, mask))
    t = t.astype(jnp.int32)
    np.testing.assert_allclose(train_lib.token_nll(x, t), nll, rtol=2e-6, atol=2e-6)
    total, count = train_lib.cross_entropy(x, t, m)
    np.testing.assert_allclose(total, (nll * mask).sum(), rtol=2e-6)
    assert float(count) == mask.sum()
    w = jnp.asarray(weights, jnp.float32)
    got = jax.grad(lambda x: (train_lib.token_nll(x, t) * w * m).sum())(x)
    np.testing.assert_allclose(got, grad, rtol=1e-5, atol=1e-6)
