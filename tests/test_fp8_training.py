"""FP8 training (ModelConfig.fp8_training; report section 3.3): which products run in FP8, the
model-level error against float32, BF16 AdamW moments, and the refusal of frozen FP8 weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, fp8, train_lib, trainer

CFG = ModelConfig(**{**TINY, "vocab_size": 96, "initializer_range": 0.02})  # vocab: no shape clash


def test_every_linear_but_head_embedding_and_router_runs_in_fp8(monkeypatch):
    """fp8.linear sees each projection once per traced layer body: a dense layer's 8 (q_a, q_b,
    kv_a, kv_b, o, gate, up, down), a MoE layer's 5 attention + 3 shared + 3 routed, the MTP
    module's eh_proj + its MoE block; never the output head (shape [d, vocab])."""
    kernels = []
    real = fp8.linear

    def spy(x, w, *args):
        kernels.append(w.shape)
        return real(x, w, *args)

    monkeypatch.setattr(fp8, "linear", spy)
    model = DeepseekV3(CFG.replace(fp8_training=True), rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    jax.eval_shape(lambda: model(ids, return_mtp=True))
    d, w = CFG.hidden_size, CFG.vocab_size
    assert (d, w) not in kernels and (w, d) not in kernels
    assert len(kernels) == 8 + 11 + 1 + 11


def test_adam_with_stored_moments_equals_optax_adam_and_keeps_bf16():
    params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((5, 7)), jnp.float32)}
    grads = [
        {"w": jnp.asarray(np.random.default_rng(i).standard_normal((5, 7)), jnp.float32)}
        for i in range(2, 6)
    ]
    ref_tx = optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)
    for dtype, rtol in (("float32", 1e-6), ("bfloat16", 2e-2)):
        tx = train_lib.scale_by_adam_stored(0.9, 0.95, 1e-8, dtype)
        state, ref_state = tx.init(params), ref_tx.init(params)
        for g in grads:
            upd, state = tx.update(g, state)
            ref, ref_state = ref_tx.update(g, ref_state)
            err = np.abs(np.asarray(upd["w"]) - np.asarray(ref["w"])).max()
            assert err <= rtol * np.abs(np.asarray(ref["w"])).max(), (dtype, err)
        assert state.mu["w"].dtype == state.nu["w"].dtype == jnp.dtype(dtype)


def test_fp8_train_step_learns_with_bf16_moments():
    """The first loss equals the float32 model's within FP8 error; then it learns."""
    cfg = CFG.replace(initializer_range=0.1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (4, 17)))
    weights = train_lib.LossWeights(0.3, 1e-4, 1e-3)
    f_graphdef, f_params, f_biases = train_lib.split_model(DeepseekV3(cfg, rngs=nnx.Rngs(0)))
    f32_loss, _ = train_lib.loss_fn(f_params, f_biases, f_graphdef, tokens, weights)
    graphdef, params, biases = train_lib.split_model(
        DeepseekV3(cfg.replace(fp8_training=True), rngs=nnx.Rngs(0))
    )
    tx = train_lib.make_optimizer(3e-3, mask=train_lib.decay_mask(params), moment_dtype="bfloat16")
    opt_state = tx.init(params)
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim >= 1]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    losses = []
    for _ in range(20):
        params, biases, opt_state, m = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, tokens
        )
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(float(f32_loss), rel=3e-3)
    assert losses[-1] < 0.6 * losses[0]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # master


def test_training_refuses_frozen_fp8_weights(tmp_path):
    from configs import shakespeare

    cfg = shakespeare.get_config()
    cfg.model.fp8_weights = True
    with pytest.raises(trainer.RunConfigError, match="fp8_training"):
        trainer.check_run_config(cfg, str(tmp_path / "run"))
    assert isinstance(cfg, ml_collections.ConfigDict)
