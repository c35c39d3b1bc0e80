"""The aux-loss-free bias balances expert load (V3 report section 2.1.2, eq. 16).

A tiny model routes fixed tokens with one expert's correction bias raised so that it takes most
tokens in every MoE layer (the main stack and the MTP block). Repeating the trainer's bias update
(``train_lib.apply_bias_update`` with the loads of ``train_lib.loss_fn``, weights fixed) moves
that load off it when gamma > 0; with gamma = 0 nothing changes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, train_lib

FAVOURED, HEAD_START = 3, 0.2  # expert 3's bias starts 0.2 above the others
TOKENS = 8 * 32  # routed by the main layers; the MTP block routes 8 * 31 (the last is cut)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _updates(graphdef, params, biases, tokens, gamma, steps):
    """``steps`` bias updates at fixed weights, as the trainer makes them after each step.

    Returns:
      loads [steps, layers, e] (main MoE layers, then MTP) routed with the biases before each
      update, and those biases [steps, layers, e].
    """
    weights = train_lib.LossWeights(0.3, 0.0, gamma)

    def update(biases, _):
        _, m = train_lib.loss_fn(params, biases, graphdef, tokens, weights)
        loads = jnp.concatenate([m["main_load"], m["mtp_loads"]])  # [layers, e]
        before = jnp.concatenate([jnp.atleast_2d(b) for b in jax.tree.leaves(biases)])
        return train_lib.apply_bias_update(biases, m, gamma), (loads, before)

    return jax.lax.scan(update, biases, None, length=steps)[1]


def _favoured_start():
    config = ModelConfig(**TINY, num_nextn_predict_layers=1, initializer_range=0.1)
    graphdef, params, biases = train_lib.split_model(DeepseekV3(config, rngs=nnx.Rngs(0)))
    flat = [
        (path, var.replace(var[...].at[..., FAVOURED].set(HEAD_START)))
        for path, var in nnx.to_flat_state(biases)
    ]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 33)))  # [b, s + 1]
    return graphdef, params, nnx.from_flat_state(flat), tokens


def _run(gamma: float, steps: int):
    graphdef, params, biases, tokens = _favoured_start()
    loads, biases = _updates(graphdef, params, biases, tokens, gamma, steps)
    return np.asarray(loads), np.asarray(biases)


def test_bias_update_moves_load_off_a_favoured_expert():
    gamma, steps = 0.002, 300  # 0.2 / 0.002 = 100 updates to undo the head start
    loads, biases = _run(gamma, steps)
    k, e = TINY["num_experts_per_tok"], TINY["n_routed_experts"]
    tokens = np.array([TOKENS, TOKENS, TOKENS - 8])  # main MoE layers 1 and 2, then MTP
    np.testing.assert_array_equal(loads.sum(-1), np.broadcast_to(tokens * k, loads.shape[:2]))
    ratio = loads.max(-1) / loads.mean(-1)  # [steps, layers] max / mean load

    # At the start the favoured expert takes most tokens in every MoE layer.
    assert np.all(loads[0, :, FAVOURED] > 0.5 * tokens), loads[0]  # of at most ``tokens``
    assert np.all(ratio[0] > 2.0), ratio[0]
    # Eq. (16), step by step: b_i += gamma * sign(mean load - load_i), recomputed here in numpy.
    expected = biases[:-1] + gamma * np.sign(loads[:-1].mean(-1, keepdims=True) - loads[:-1])
    np.testing.assert_allclose(biases[1:], expected, atol=1e-6)
    # After the updates the favoured expert carries about its share (tokens * k / e) and the
    # layers are balanced: over the last 100 updates, max/mean load is below 1.3 on average.
    last = slice(steps - 100, steps)
    assert np.all(loads[last, :, FAVOURED].mean(0) < 1.5 * tokens * k / e), loads[-1]
    assert np.all(ratio[last].mean(0) < 1.3), ratio[last].mean(0)
    others = np.delete(biases[-1], FAVOURED, axis=-1).mean(-1)
    assert np.all(biases[-1][:, FAVOURED] - others < HEAD_START / 2)  # its head start shrank


def test_without_gamma_the_load_stays_skewed():
    loads, biases = _run(0.0, 5)
    np.testing.assert_array_equal(biases, np.broadcast_to(biases[0], biases.shape))
    np.testing.assert_array_equal(loads, np.broadcast_to(loads[0], loads.shape))
    ratio = loads[-1].max(-1) / loads[-1].mean(-1)
    assert np.all(ratio > 2.0) and np.all(loads[-1].argmax(-1) == FAVOURED)
