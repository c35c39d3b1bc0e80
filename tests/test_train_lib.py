import jax
import jax.numpy as jnp
import numpy as np
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
